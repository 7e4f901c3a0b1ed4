"""Branching: continue a generation from any of its tokens with another choice, kept as a small tree.

``Branches(llm, prompt, params)`` generates the root branch (with logprobs and the top
alternatives of every token). ``fork(position, token)`` keeps the current branch's tokens before
``position``, puts ``token`` there instead, and lets the engine continue from prompt + those
tokens (a fresh request on exactly that prefix: with prefix caching on, the shared prefix is
reused; without it, it is computed again). Each fork is a new branch whose parent is the branch
it came from; ``select`` / ``back`` walk the tree, ``texts()`` gives every branch's text.
Shown as the token probability view of the current branch plus the tree; :meth:`Branches.show`
gives the widget where clicking a token lists its alternatives and choosing one forks.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from .api import with_seed
from .probs import decoder_for
from .prompting import build_inputs
from .token_view import DEFAULT_TOP_K, TokenRow, bundle, html_view, output_rows, prompt_rows

LOGPROBS = {"return_logprob": True, "top_logprobs_num": DEFAULT_TOP_K}


@dataclass
class Branch:
    """One path: its generated tokens (with probabilities), where it left its parent and with which token."""

    index: int
    parent: int | None
    position: int | None  # where it forked from the parent (None: the root)
    token_id: int | None  # the token chosen there
    rows: list[TokenRow]
    output: dict  # the generate output of the part this branch generated itself
    children: list[int] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return [r.token.token_id for r in self.rows]


class Branches:
    """A tree of continuations of one prompt. ``fork(position, token)`` → the new branch (now current)."""

    def __init__(self, llm: Any, prompt: str | None = None, sampling_params: dict | None = None, *,
                 input_ids: list[int] | None = None, chat: bool | None = None, system: str | None = None,
                 output: dict | None = None, **params: Any) -> None:
        """``prompt`` (text, through the chat template where the model has one unless ``chat=False``) or
        ``input_ids``; ``output``: an already generated root (with logprobs) for these ``input_ids``."""
        self.llm = llm
        self.params = with_seed({"max_new_tokens": 64, **(sampling_params or {}), **params})
        if (prompt is None) == (input_ids is None):
            raise ValueError("Branches needs a prompt or input_ids (one of them).")
        if input_ids is None:
            texts, ids, _ = build_inputs(llm, [prompt], chat, system)
            input_ids = ids[0] if ids else self._encode(texts[0])
        self.prompt_ids = list(input_ids)
        self.decode = decoder_for(llm)
        self.branches: list[Branch] = []
        self.current = 0
        if output is None:
            output = llm.generate(input_ids=self.prompt_ids, sampling_params=self.params, **LOGPROBS)
        self.branches.append(Branch(0, None, None, None, output_rows(output, self.decode), output))
        # the prompt's own tokens, where the root was generated with them (logprob_start_len=0)
        meta = output["meta_info"]
        whole = len(meta.get("input_token_logprobs") or []) == meta.get("prompt_tokens")
        self.prompt_rows = prompt_rows(output, self.decode) if whole else None
        self._widget = None

    def _encode(self, text: str) -> list[int]:
        tok = getattr(self.llm, "tokenizer", None)
        if tok is None:
            raise ValueError("This engine has no tokenizer: pass input_ids.")
        return tok.encode(text)

    # ----------------------------------------------------------- the tree
    @property
    def branch(self) -> Branch:
        return self.branches[self.current]

    def _token_id(self, token: int | str, row: TokenRow) -> int:
        if isinstance(token, int) and not isinstance(token, bool):
            return token
        if not isinstance(token, str):
            raise TypeError(f"token must be a token id (int) or its text (str), got {type(token).__name__}.")
        for _, alt in row.top:  # an alternative's text as shown
            if alt.text == token:
                return alt.token_id
        tok = getattr(self.llm, "tokenizer", None)
        ids = tok.encode(token, add_special_tokens=False) if tok is not None else []
        if len(ids) != 1:
            raise ValueError(f"{token!r} is not one token (it encodes to {len(ids)}); pass a token id, "
                             "or one of the alternatives' texts.")
        return ids[0]

    def fork(self, position: int, token: int | str, branch: int | None = None) -> Branch:
        """Continue branch ``branch`` (default: the current one) from ``position`` with ``token`` instead
        of what it had there; returns the new branch, which becomes the current one."""
        src = self.branches[self.current if branch is None else branch]
        if not isinstance(position, int) or not 0 <= position < len(src.rows):
            raise ValueError(f"position must be an int in [0, {len(src.rows) - 1}] (a generated token of "
                             f"branch {src.index}), got {position!r}.")
        old = src.rows[position]
        token_id = self._token_id(token, old)
        lp = next((v for v, t in old.top if t.token_id == token_id), None)
        forced = TokenRow(position, self.decode(token_id), lp, old.top, forced=True)
        kept = src.rows[:position]
        prefix = self.prompt_ids + [r.token.token_id for r in kept] + [token_id]
        budget = max(1, self.params["max_new_tokens"] - position - 1)
        out = self.llm.generate(input_ids=prefix, sampling_params={**self.params, "max_new_tokens": budget},
                                **LOGPROBS)
        new_rows = [TokenRow(position + 1 + r.position, r.token, r.logprob, r.top)
                    for r in output_rows(out, self.decode)]
        b = Branch(len(self.branches), src.index, position, token_id, kept + [forced] + new_rows, out)
        src.children.append(b.index)
        self.branches.append(b)
        self.current = b.index
        self._redraw()
        return b

    def select(self, index: int) -> Branch:
        if not isinstance(index, int) or not 0 <= index < len(self.branches):
            raise ValueError(f"branch must be an int in [0, {len(self.branches) - 1}], got {index!r}.")
        self.current = index
        self._redraw()
        return self.branch

    def back(self) -> Branch:
        """To the current branch's parent (the root stays)."""
        return self.select(self.branch.parent if self.branch.parent is not None else 0)

    def text(self, index: int | None = None) -> str:
        b = self.branches[self.current if index is None else index]
        tok = getattr(self.llm, "tokenizer", None)
        return tok.decode(b.token_ids) if tok is not None else " ".join(f"#{t}" for t in b.token_ids)

    def texts(self) -> list[str]:
        """Every branch's generated text, in the order they were made (the root first)."""
        return [self.text(i) for i in range(len(self.branches))]

    # ------------------------------------------------------------- views
    def _label(self, b: Branch) -> str:
        if b.parent is None:
            return "root"
        return f"{b.index}: from {b.parent} at {b.position} → {self.decode(b.token_id).text!r}"

    def tree_text(self) -> str:
        lines = []

        def walk(i: int, depth: int) -> None:
            b = self.branches[i]
            mark = "*" if i == self.current else " "
            lines.append(f"{mark} {'  ' * depth}{self._label(b)}: {self.text(i)[:60]!r}")
            for c in b.children:
                walk(c, depth + 1)

        walk(0, 0)
        return "\n".join(lines)

    def tree_html(self) -> str:
        items = []
        for b in self.branches:
            depth = 0
            p = b.parent
            while p is not None:
                depth += 1
                p = self.branches[p].parent
            cur = b.index == self.current
            items.append(f'<div class="nbe-branch{" nbe-current" if cur else ""}" data-branch="{b.index}" '
                         f'style="cursor: pointer; padding-left: {12 * depth}px; font-size: 12px; '
                         f'{"font-weight: 600;" if cur else ""}">{html.escape(self._label(b))}: '
                         f'{html.escape(self.text(b.index)[:60])}</div>')
        return f'<div class="nbe-tree" style="margin-top: 6px;">{"".join(items)}</div>'

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        b = self.branch
        view = bundle(b.rows, self.prompt_rows, self.text(), note=f"branch {b.index} of {len(self.branches)}")
        return {"text/html": view["text/html"] + self.tree_html(),
                "text/plain": view["text/plain"] + "\n\nbranches:\n" + self.tree_text()}

    def widget(self) -> Any:
        """The clickable widget (needs anywidget: ``pip install anywidget``)."""
        from .branch_widget import BranchWidget

        if self._widget is None:
            self._widget = BranchWidget(self)
        return self._widget

    def show(self) -> Any:
        """Display the clickable widget; without anywidget, the static view."""
        from IPython.display import display

        try:
            w = self.widget()
        except ImportError:
            display(self)
            return self
        display(w)
        return w

    def view_html(self) -> str:
        b = self.branch
        return html_view(b.rows, self.prompt_rows, note=f"branch {b.index} of {len(self.branches)} · click a token for its "
                                      "alternatives", details=False) + self.tree_html()

    def _redraw(self) -> None:
        if self._widget is not None:
            self._widget.sync()

"""Token probabilities in the notebook: ``show_tokens(output)`` and ``%%generate --show probs|prompt``.

``show_tokens`` renders a finished output dict (generated with logprobs); :class:`ProbsView` is the
live view of a streamed run: each pane's tokens get their colour as they arrive (redrawn at most
~20 times a second by :class:`~nbengine.notebook.live.LiveRun`, only the new tokens rendered), and
the finished pane keeps the static HTML plus a ``text/plain`` table, so a saved notebook shows it
without a kernel.
"""

from __future__ import annotations

from typing import Any

from . import render
from .token_text import TokenDecoder
from .token_view import (DEFAULT_TOP_K, SpanCache, TokenRow, bundle, html_view, output_rows, prompt_rows,
                         text_table)
from .views import NotebookView, TerminalView

SHOW = ("text", "probs", "prompt")


def logprob_args(show: str, top_k: int = DEFAULT_TOP_K) -> dict[str, Any]:
    """``generate``'s logprob arguments for a ``--show`` mode ({} for plain text)."""
    if show not in SHOW:
        raise ValueError(f"show must be one of {', '.join(SHOW)}; got {show!r}.")
    if show == "text":
        return {}
    args: dict[str, Any] = {"return_logprob": True, "top_logprobs_num": top_k}
    if show == "prompt":
        args["logprob_start_len"] = 0
    return args


def decoder_for(llm: Any = None, tokenizer: Any = None) -> TokenDecoder:
    """A token decoder from an engine or a tokenizer; without either, the notebook's current engine's
    tokenizer (tokens show as ``#id`` when there is none)."""
    if tokenizer is None and llm is not None:
        tokenizer = getattr(llm, "tokenizer", None)
    if tokenizer is None and llm is None:
        tokenizer = getattr(_current_engine(), "tokenizer", None)
    return TokenDecoder(tokenizer)


def _current_engine() -> Any:
    from . import _loaded

    for magics in _loaded.values():
        reg = magics.registry
        if reg.current in reg.engines:
            return reg.engines[reg.current]
    return None


class TokenProbs:
    """A finished output's tokens with their probabilities; shows itself as the probability view."""

    def __init__(self, output: dict, decode: TokenDecoder, prompt: bool | None = None, note: str = "") -> None:
        self.output = output
        self.rows: list[TokenRow] = output_rows(output, decode)
        meta = output.get("meta_info", {})
        # the whole prompt's logprobs (logprob_start_len=0); by default generate returns only the last one's
        has_prompt = len(meta.get("input_token_logprobs") or []) == meta.get("prompt_tokens")
        if prompt and not has_prompt:
            prompt_rows(output, decode)  # raises with what to pass
        self.prompt_rows: list[TokenRow] | None = prompt_rows(output, decode) if (
            has_prompt if prompt is None else prompt) else None
        self.note = note

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        return bundle(self.rows, self.prompt_rows, self.output.get("text"), self.note)

    def __repr__(self) -> str:
        return self._repr_mimebundle_()["text/plain"]


def show_tokens(output: dict, llm: Any = None, *, tokenizer: Any = None, prompt: bool | None = None,
                display: bool = True) -> TokenProbs:
    """Show ``output`` (a ``generate`` dict with ``return_logprob=True, top_logprobs_num=5``) token by token,
    each shaded by its probability, its alternatives on hover. ``prompt``: also the prompt tokens
    (needs ``logprob_start_len=0``; default: where the output has them). Returns the view object."""
    if not isinstance(output, dict) or "meta_info" not in output:
        raise TypeError(f"show_tokens takes one output dict of generate, got {type(output).__name__}.")
    view = TokenProbs(output, decoder_for(llm, tokenizer), prompt)
    if display:
        from IPython.display import display as _display

        _display(view)
    return view


class ProbsView(NotebookView):
    """``%%generate --show probs|prompt``: panes of coloured tokens, coloured as they arrive."""

    def __init__(self, fmt: str, model: str, params: dict, widgets: bool, extra_meta: dict | None = None,
                 *, decode: TokenDecoder, prompt: bool = False) -> None:
        super().__init__(fmt, model, params, widgets, extra_meta)
        self.decode = decode
        self.prompt = prompt
        self._spans: dict[int, SpanCache] = {}
        self._prompt_html: dict[int, tuple[list[TokenRow], str]] = {}

    def _rows(self, run: Any, i: int) -> tuple[list[TokenRow], list[TokenRow] | None]:
        out = run.samples[i].output()
        rows = output_rows(out, self.decode) if "output_token_logprobs" in out["meta_info"] else []
        if not self.prompt:
            return rows, None
        if i not in self._prompt_html and out["meta_info"].get("input_token_logprobs"):
            prows = prompt_rows(out, self.decode)
            self._prompt_html[i] = (prows, SpanCache(surprise=True).render(prows))
        return rows, self._prompt_html.get(i, (None, ""))[0]

    def streaming_bundle(self, run: Any, i: int) -> dict:
        rows, prompt = self._rows(run, i)
        spans = self._spans.setdefault(i, SpanCache()).render(rows)
        label = run.samples[i].label if len(run.samples) > 1 else ""
        html = html_view(rows, prompt, note=label, spans=spans, details=False,
                         prompt_spans=self._prompt_html[i][1] if i in self._prompt_html else None)
        return {"text/html": html, "text/plain": run.samples[i].text}

    def finish_panes(self, run: Any, stats: dict) -> None:
        """Widgets, one sample, not stopped: the pane becomes the clickable branch view."""
        super().finish_panes(run, stats)
        out = run.samples[0].output() if len(run.samples) == 1 else None
        if not self.widgets or out is None or render.was_stopped(out) or not out["output_ids"]:
            return
        try:
            from .branch_widget import BranchWidget  # noqa: F401 - anywidget installed?
        except ImportError:
            return
        from IPython.display import update_display

        from .branches import Branches

        b = run.batches[0]
        ids = b.input_ids[0] if b.input_ids else b.llm.tokenizer.encode(b.prompts[0])
        self.branches = Branches(b.llm, input_ids=ids, output=out, sampling_params=b.params)
        widget = self.branches.widget()
        update_display(widget, display_id=self.panes[0].display_id,
                       metadata=render.metadata(out, stats, self.model, self.params, self.extra_meta))

    def final_bundle(self, run: Any, i: int, out: dict) -> dict:
        rows, prompt = self._rows(run, i)
        note = run.samples[i].label if len(run.samples) > 1 else ""
        if render.was_stopped(out):
            note = (note + " · " if note else "") + render.stopped_note(out)
        return bundle(rows, prompt, out.get("text"), note)


class ProbsTerminalView(TerminalView):
    """Terminal / script: the text as it comes, then each sample's probability table."""

    def __init__(self, fmt: str, model: str, params: dict, *, decode: TokenDecoder, prompt: bool = False) -> None:
        super().__init__(fmt, model, params)
        self.decode = decode
        self.prompt = prompt

    def finish(self, run: Any) -> None:
        super().finish(run)
        for s in run.samples:
            out = s.output()
            if "output_token_logprobs" in out["meta_info"]:
                probs = TokenProbs(out, self.decode, self.prompt or None)
                self.out.write(text_table(probs.rows, probs.prompt_rows) + "\n")
        self.out.flush()


def probs_view(view: Any, llm: Any, show: str) -> Any:
    """The probability view matching a plain one made by :func:`~nbengine.notebook.views.make_view`."""
    decode = decoder_for(llm)
    prompt = show == "prompt"
    if isinstance(view, NotebookView):
        return ProbsView(view.fmt, view.model, view.params, view.widgets, view.extra_meta, decode=decode,
                         prompt=prompt)
    return ProbsTerminalView(view.fmt, view.model, getattr(view, "params", {}), decode=decode, prompt=prompt)

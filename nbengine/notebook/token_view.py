"""The token probability view: each token shaded by its probability, its alternatives on hover.

Static HTML (inline styles, no script), so a saved notebook shows it in JupyterLab and nbviewer
without a kernel; where styles are stripped (GitHub) the HTML still carries a plain table of the
probabilities in a ``<details>`` block, and ``text/plain`` has the same table. Every token is one
``<span class="nbe-tok">`` with ``data-i`` (position), ``data-id`` (token id), ``data-p``
(probability) and ``data-lp`` (logprob); token text is escaped, whitespace kept, newlines shown
as ``↵``, partial UTF-8 bytes as ``<0xNN>`` byte pieces.

Probabilities are the model's own (the raw distribution, before temperature / top-p), as the
engine's logprobs are.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Iterable

from .token_text import TokenDecoder, TokenText

DEFAULT_TOP_K = 5  # alternatives asked for (top_logprobs_num)

_BOX = ("font-family: var(--jp-code-font-family, ui-monospace, monospace); font-size: 13px; "
        "line-height: 1.9; color: var(--jp-content-font-color1, #111);")
_TEXT = "white-space: pre-wrap; word-break: break-word;"
_TOK = "color: #111; border-radius: 3px; padding: 1px 0; margin: 0 0.5px;"


@dataclass
class TokenRow:
    """One token of a sequence with its logprob and the top alternatives at its position."""

    position: int
    token: TokenText
    logprob: float | None
    top: list[tuple[float, TokenText]] = field(default_factory=list)
    forced: bool = False  # put there by a fork, not sampled

    @property
    def prob(self) -> float | None:
        return None if self.logprob is None else math.exp(self.logprob)


# ------------------------------------------------------------------ rows from output dicts
def output_rows(out: dict, decode: TokenDecoder, start: int = 0) -> list[TokenRow]:
    """Rows for the generated tokens of ``out`` from position ``start`` (needs ``return_logprob=True``)."""
    meta = out.get("meta_info", {})
    lps = meta.get("output_token_logprobs")
    if lps is None:
        raise ValueError("This output has no logprobs: generate with return_logprob=True and "
                         f"top_logprobs_num={DEFAULT_TOP_K} to see token probabilities.")
    tops = meta.get("output_top_logprobs") or []
    return [_row(i, lps[i], tops[i] if i < len(tops) else None, decode) for i in range(start, len(lps))]


def prompt_rows(out: dict, decode: TokenDecoder) -> list[TokenRow]:
    """Rows for the prompt tokens (``logprob_start_len=0`` gives all of them; the first has no logprob)."""
    meta = out.get("meta_info", {})
    lps = meta.get("input_token_logprobs")
    if not lps:
        raise ValueError("This output has no prompt logprobs: generate with return_logprob=True and "
                         "logprob_start_len=0 to see the prompt's tokens.")
    tops = meta.get("input_top_logprobs") or []
    return [_row(i, lp, tops[i] if i < len(tops) else None, decode) for i, lp in enumerate(lps)]


def _row(i: int, entry: tuple, top: list | None, decode: TokenDecoder) -> TokenRow:
    logprob, token_id = entry[0], entry[1]
    alts = [(float(v), decode(t)) for v, t, *_ in (top or []) if v is not None]
    return TokenRow(i, decode(token_id), None if logprob is None else float(logprob), alts)


def perplexity(rows: Iterable[TokenRow]) -> float | None:
    lps = [r.logprob for r in rows if r.logprob is not None and not r.forced]
    return math.exp(-sum(lps) / len(lps)) if lps else None


# ----------------------------------------------------------------------------- HTML
def colour(p: float) -> str:
    """Red (unlikely) through yellow to green (likely); pale, so dark text reads on it."""
    return f"hsl({120 * min(max(p, 0.0), 1.0):.0f}, 75%, 80%)"


def legend() -> str:
    ramp = ", ".join(colour(p) for p in (0.0, 0.25, 0.5, 0.75, 1.0))
    return (f'<span class="nbe-legend" style="white-space: nowrap;">p = 0 '
            f'<span style="display: inline-block; width: 110px; height: 10px; vertical-align: middle; '
            f'border-radius: 2px; background: linear-gradient(to right, {ramp});"></span> 1</span>')


def _piece_html(tok: TokenText) -> str:
    parts = []
    for piece in tok.pieces:
        text = html.escape(piece.text)
        if piece.kind == "byte":
            parts.append(f'<span class="nbe-byte" style="font-size: 0.8em; opacity: 0.8;">{text}</span>')
        elif piece.kind == "special":
            parts.append(f'<span class="nbe-special" style="font-style: italic; opacity: 0.7;">{text}</span>')
        else:
            parts.append(text.replace("\n", "↵\n"))
    return "".join(parts)


def tooltip(row: TokenRow, surprise: bool = False) -> str:
    """The hover text: probability (or surprise), then the alternatives with theirs."""
    if row.logprob is None:
        head = "first token (nothing before it to predict it)" if surprise else "probability unknown"
    elif surprise:
        head = f"surprise {-row.logprob / math.log(2):.2f} bits (p = {row.prob:.4f})"
    else:
        head = f"p = {row.prob:.4f} (logprob {row.logprob:.3f})"
    if row.forced:
        head += ", chosen by a fork"
    lines = [f"{_short(row.token)}: {head}"]
    if row.top:
        lines.append("alternatives:")
        lines += [f"  {_short(t)}  {math.exp(v):.4f}" for v, t in row.top]
    return "\n".join(lines)


def _short(tok: TokenText) -> str:
    return repr(tok.text)


def token_span(row: TokenRow, surprise: bool = False) -> str:
    p = row.prob
    style = _TOK + (f" background: {colour(p)};" if p is not None else " background: #e8e8e8;")
    if row.forced:
        style += " outline: 2px solid #3b6fd4;"
    if row.token.special:
        style += " border: 1px dashed #888;"
    attrs = (f'class="nbe-tok" data-i="{row.position}" data-id="{row.token.token_id}"'
             + (f' data-p="{p:.6f}" data-lp="{row.logprob:.6f}"' if p is not None else "")
             + (' data-forced="1"' if row.forced else ""))
    return (f'<span {attrs} title="{html.escape(tooltip(row, surprise), quote=True)}" style="{style}">'
            f"{_piece_html(row.token)}</span>")


class SpanCache:
    """Spans of a growing sequence, each rendered once (a streaming view redraws only the new tokens)."""

    def __init__(self, surprise: bool = False) -> None:
        self.surprise = surprise
        self.spans: list[str] = []

    def render(self, rows: list[TokenRow]) -> str:
        if len(rows) < len(self.spans):
            self.spans = []
        self.spans += [token_span(r, self.surprise) for r in rows[len(self.spans):]]
        return "".join(self.spans)


def header(rows: list[TokenRow], prompt: list[TokenRow] | None = None, note: str = "") -> str:
    parts = [f"{len(rows)} tokens"]
    ppl = perplexity(rows)
    if ppl is not None:
        parts.append(f"perplexity {ppl:.2f}")
    if prompt is not None:
        pp = perplexity(prompt)
        parts.append(f"prompt: {len(prompt)} tokens" + (f", perplexity {pp:.2f}" if pp is not None else ""))
    if note:
        parts.append(html.escape(note))
    return (f'<div class="nbe-head" style="font-size: 12px; opacity: 0.85; margin-bottom: 2px;">'
            f'{" · ".join(parts)} · {legend()}</div>')


def html_view(rows: list[TokenRow], prompt: list[TokenRow] | None = None, *, note: str = "",
              spans: str | None = None, prompt_spans: str | None = None, details: bool = True) -> str:
    """The whole view. ``spans`` / ``prompt_spans``: already rendered (a :class:`SpanCache`)."""
    body = spans if spans is not None else "".join(token_span(r) for r in rows)
    out = [f'<div class="nbe-tokens nbe-static" style="{_BOX}">', header(rows, prompt, note)]
    if prompt is not None:
        pbody = prompt_spans if prompt_spans is not None else "".join(token_span(r, True) for r in prompt)
        out.append(f'<div class="nbe-prompt" style="{_TEXT} border-left: 3px solid #999; padding-left: 6px; '
                   f'margin-bottom: 4px;">{pbody}</div>')
    out.append(f'<div class="nbe-output" style="{_TEXT}">{body}</div>')
    if details:
        out.append('<details class="nbe-table"><summary style="font-size: 12px; opacity: 0.8;">'
                   "token probabilities as text</summary><pre>"
                   f"{html.escape(text_table(rows, prompt))}</pre></details>")
    out.append("</div>")
    return "".join(out)


# ----------------------------------------------------------------------------- text
def text_table(rows: list[TokenRow], prompt: list[TokenRow] | None = None) -> str:
    lines = []
    if prompt is not None:
        lines.append(f"prompt ({len(prompt)} tokens, perplexity {_fmt(perplexity(prompt))}): position, token, p")
        lines += [f"{r.position:5d}  {_short(r.token):<24} {_fmt(r.prob, 4)}" for r in prompt]
        lines.append("")
    lines.append(f"output ({len(rows)} tokens, perplexity {_fmt(perplexity(rows))}): position, token, p, alternatives")
    for r in rows:
        alts = " · ".join(f"{_short(t)} {math.exp(v):.3f}" for v, t in r.top if t.token_id != r.token.token_id)
        mark = " (fork)" if r.forced else ""
        lines.append(f"{r.position:5d}  {_short(r.token):<24} {_fmt(r.prob, 4)}{mark}" + (f"   {alts}" if alts else ""))
    return "\n".join(lines)


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def bundle(rows: list[TokenRow], prompt: list[TokenRow] | None = None, text: str | None = None,
           note: str = "") -> dict[str, str]:
    """``text/html`` (the view) and ``text/plain`` (the text, then the probability table)."""
    plain = text_table(rows, prompt)
    if text is not None:
        plain = f"{text}\n\n{plain}"
    return {"text/html": html_view(rows, prompt, note=note), "text/plain": plain}

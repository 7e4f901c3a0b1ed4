"""Side by side: one prompt under several sampling settings, seeds or engines, streamed into a grid.

``compare(prompt, [params, ...], models=[...])`` runs every (engine, params) pair at once — one
``generate`` call (one batch) per engine — through a :class:`~nbengine.notebook.live.LiveRun`, and
shows the panes in a CSS grid redrawn at most ~20 times a second, each with its own stats (tokens,
TTFT, tok/s, finish). The result is the list of output dicts, engine-major then params order.
"""

from __future__ import annotations

import html
import itertools
from typing import Any

from . import render
from .api import execute, model_label, with_seed
from .live import Batch, LiveRun
from .prompting import build_inputs
from .views import NotebookView, _display, _update, make_view

MAX_PANES = 16


def _differing(params: list[dict]) -> list[str]:
    keys = sorted({k for p in params for k in p})
    return [k for k in keys if len({repr(p.get(k)) for p in params}) > 1]


def pane_labels(models: list[str], params: list[dict]) -> list[str]:
    """``model · key=value, ...`` naming only what differs between the panes."""
    keys = _differing(params)
    many_models = len(set(models)) > 1
    labels = []
    for m in models:
        for p in params:
            parts = ([m] if many_models or not keys else []) + [f"{k}={p.get(k)}" for k in keys]
            labels.append(" · ".join(parts))
    return labels


def grid_params(base: dict, **lists: list) -> list[dict]:
    """Every combination of the listed values over ``base``: ``grid_params({}, temperature=[0, 1], seed=[1, 2])``."""
    keys = [k for k, v in lists.items() if v]
    if not keys:
        return [dict(base)]
    return [{**base, **dict(zip(keys, combo))} for combo in itertools.product(*(lists[k] for k in keys))]


class GridView(NotebookView):
    """All panes in one HTML grid (plain text per pane as the fallback)."""

    def start_panes(self, run: Any) -> None:
        self.grid = _display(self._bundle(run, final=False))

    def refresh_panes(self, run: Any, changed: list[int]) -> None:
        _update(self.grid, self._bundle(run, final=False))

    def finish_panes(self, run: Any, stats: dict) -> None:
        outs = run.outputs()
        meta = render.metadata(outs[0], stats, self.model, self.params, self.extra_meta)
        meta["nbengine"]["panes"] = [{"label": s.label, **s.stats(run.t_start)} for s in run.samples]
        _update(self.grid, self._bundle(run, final=True), metadata=meta)

    def _bundle(self, run: Any, final: bool) -> dict:
        cols = min(len(run.samples), 3)
        panes, plain = [], []
        for s in run.samples:
            st = s.stats(run.t_start)
            line = f"{st['completion_tokens']} tokens"
            if st["tok_per_s"]:
                line += f" · {st['tok_per_s']:.1f} tok/s"
            if st["ttft_s"] is not None:
                line += f" · TTFT {st['ttft_s']:.2f} s"
            reason = st["finish_reason"]
            line += f" · {reason['type']}" if reason else (" · generating" if not final else "")
            panes.append(
                f'<div class="nbe-pane" style="border: 1px solid #d0d7e2; border-radius: 4px; padding: 6px; min-width: 0;">'
                f'<div class="nbe-pane-label" style="font-weight: 600; font-size: 12px;">{html.escape(s.label)}</div>'
                f'<div class="nbe-pane-stats" style="font-size: 11px; opacity: 0.7; margin-bottom: 4px;">{html.escape(line)}</div>'
                f'<div class="nbe-pane-text" style="white-space: pre-wrap; word-break: break-word; font-size: 13px;">'
                f"{html.escape(s.text)}</div></div>")
            plain.append(f"--- {s.label} ({line})\n{s.text}")
        grid = (f'<div class="nbe-compare" style="display: grid; grid-template-columns: repeat({cols}, minmax(0, 1fr)); '
                f'gap: 8px;">{"".join(panes)}</div>')
        return {"text/html": grid, "text/plain": "\n".join(plain)}


def compare(prompt: str, params: list[dict] | dict | None = None, *, models: list[Any] | None = None,
            chat: bool | None = None, system: str | None = None, ui: str = "auto", **common: Any) -> list[dict]:
    """Run ``prompt`` under each sampling setting in ``params`` (a list of dicts; keyword arguments are
    shared by all) on each engine in ``models`` (default: the notebook's current engine), all at once,
    streamed side by side. Returns the output dicts, engine-major then params order.

    ``compare("Once upon a time", [{"temperature": 0}, {"temperature": 1.0, "seed": 1}], max_new_tokens=64)``
    """
    if not isinstance(prompt, str) or not prompt:
        raise TypeError("compare takes one non-empty prompt string; run a batch with nbengine.notebook.stream.")
    if isinstance(params, dict):
        params = [params]
    params = [with_seed({**common, **p}) for p in (params or [{}])]
    if any((p.get("n", 1) or 1) != 1 for p in params):
        raise ValueError("compare shows one pane per setting: leave n at 1 (list several seeds instead).")
    if models is None:
        from .probs import _current_engine

        current = _current_engine()
        if current is None:
            raise ValueError("compare needs an engine: pass models=[llm, ...] (or run %%generate / "
                             "%nbengine load first so the notebook has a current engine).")
        models = [current]
    if not models:
        raise ValueError("models is empty: pass at least one engine.")
    if len(models) * len(params) > MAX_PANES:
        raise ValueError(f"compare shows at most {MAX_PANES} panes; got {len(models)} engines × {len(params)} settings.")
    names = [model_label(m) for m in models]
    batches = []
    for llm in models:
        texts, ids, _ = build_inputs(llm, [prompt] * len(params), chat, system)
        batches.append(Batch(llm, texts, ids, params))
    label = " vs ".join(dict.fromkeys(names))
    view = make_view("text", label, params[0], ui)
    if isinstance(view, NotebookView):
        view = GridView(view.fmt, view.model, {"compare": params}, view.widgets)
    run = execute(LiveRun(models[0], view, labels=pane_labels(names, params), batches=batches))
    return run.outputs()

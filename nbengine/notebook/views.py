"""What a live run looks like: notebook outputs (+ a widget bar with Stop), or plain terminal text.

Notebook: one output per sample, ``text/plain`` while streaming (cheap to redraw), replaced
through its display_id by the chosen format when done, with the metadata attached, so the
saved notebook keeps the answer. Above the samples a controls bar: with widgets a Stop button,
a stats line and (batches) a progress bar, replaced by a static stats line at the end; without
widgets the stats line alone.
"""

from __future__ import annotations

import sys
from typing import Any

from . import render


def _display(obj: Any, raw: bool = True) -> Any:
    """Show a mime bundle (``raw``) or a displayable object; returns its handle for updates."""
    from IPython.display import display

    return display(obj, raw=raw, display_id=True)


def _update(handle: Any, bundle: dict, **kw: Any) -> None:
    from IPython.display import update_display

    if handle is not None:
        update_display(bundle, raw=True, display_id=handle.display_id, **kw)


def widgets_available() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken: plain display then
        return False
    return True


def _route_clicks_to_their_subshell(widget: Any) -> None:
    """Let the frontend's clicks run on the subshell they arrive on, while the cell still runs.

    JupyterLab >= 4.4 sends widget messages on a kernel subshell (ipykernel >= 7), handled on
    a subshell thread even while the main thread runs the cell. ipykernel 7.4 sends comm
    messages back to the subshell the comm last published from (the main shell here, busy with
    this cell) unless the comm says otherwise: our Stop button needs no reply routing, so it
    keeps the frontend's choice.
    """
    comm = getattr(widget, "comm", None)
    if comm is not None and hasattr(comm, "_reply_subshell_for"):
        comm._reply_subshell_for = lambda data, default: default


def _close_tree(widget: Any) -> None:
    """Close a widget with its children and their layout/style models (``close()`` alone leaves those open)."""
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    for part in ("layout", "style"):
        sub = getattr(widget, part, None)
        if sub is not None and hasattr(sub, "close"):
            sub.close()
    widget.close()


class NotebookView:
    def __init__(self, fmt: str, model: str, params: dict, widgets: bool, extra_meta: dict | None = None) -> None:
        self.fmt = fmt
        self.model = model
        self.params = params
        self.widgets = widgets
        self.extra_meta = extra_meta
        self.panes: list[Any] = []
        self._controls = None
        self._box = self._stats = self._bar = self.button = None

    def start(self, run: Any) -> None:
        line = render.stats_line(run.stats(), self.model)
        if self.widgets:
            import ipywidgets as w

            self.button = w.Button(description="Stop", icon="stop", button_style="danger",
                                   tooltip="Abort the generation (the kernel's interrupt does too)",
                                   layout=w.Layout(width="auto"))
            self.button.on_click(run.request_stop)
            self._stats = w.Label(value=line)
            parts = [self.button, self._stats]
            if len(run.samples) > 1:
                self._bar = w.IntProgress(value=0, min=0, max=len(run.samples), layout=w.Layout(width="160px"))
                parts.insert(1, self._bar)
            self._box = w.HBox(parts)
            self._box.add_class("nbengine-controls")
            self._controls = _display(self._box, raw=False)
            _route_clicks_to_their_subshell(self.button)
        else:
            self._controls = _display({"text/plain": line})
        self.start_panes(run)

    def start_panes(self, run: Any) -> None:
        self.panes = [_display(self.streaming_bundle(run, i)) for i in range(len(run.samples))]

    def streaming_bundle(self, run: Any, i: int) -> dict:
        """What pane ``i`` shows while it streams (plain text: cheap to redraw)."""
        s = run.samples[i]
        return {"text/plain": f"[{s.label}]\n{s.text}" if len(run.samples) > 1 else s.text}

    def final_bundle(self, run: Any, i: int, out: dict) -> dict:
        """What pane ``i`` keeps once done (the chosen format; batches say which sample each pane is)."""
        b = render.bundle(out, self.fmt)
        if len(run.samples) > 1:
            label = run.samples[i].label
            b = {k: (f"**{label}**\n\n{v}" if k == "text/markdown" else f"[{label}]\n{v}")
                 if isinstance(v, str) else v for k, v in b.items()}
        return b

    def refresh(self, run: Any, changed: list[int]) -> None:
        self.refresh_panes(run, changed)
        line = render.stats_line(run.stats(), self.model)
        if self.widgets:
            with self._box.hold_sync():
                self._stats.value = line
                if self._bar is not None:
                    self._bar.value = run.num_done
        else:
            _update(self._controls, {"text/plain": line})

    def refresh_panes(self, run: Any, changed: list[int]) -> None:
        for i in changed:
            _update(self.panes[i], self.streaming_bundle(run, i))

    def finish(self, run: Any) -> None:
        stats = run.stats()
        self.finish_panes(run, stats)
        _update(self._controls, {"text/plain": render.stats_line(stats, self.model, final=True)})
        if self._box is not None:
            _close_tree(self._box)

    def finish_panes(self, run: Any, stats: dict) -> None:
        for i, s in enumerate(run.samples):
            out = s.output()
            _update(self.panes[i], self.final_bundle(run, i, out),
                    metadata=render.metadata(out, stats, self.model, self.params, self.extra_meta))


class TerminalView:
    """Terminal IPython or a plain script: the text as it comes, then a stats line."""

    def __init__(self, fmt: str, model: str, params: dict, out: Any = None) -> None:
        self.fmt = fmt
        self.model = model
        self.params = params
        self.out = out or sys.stdout
        self._shown = 0

    def start(self, run: Any) -> None:
        self._shown = 0

    def refresh(self, run: Any, changed: list[int]) -> None:
        if len(run.samples) == 1:
            text = run.samples[0].text
            if len(text) >= self._shown:
                self.out.write(text[self._shown:])
                self._shown = len(text)
            self.out.flush()

    def finish(self, run: Any) -> None:
        if len(run.samples) == 1:
            self.refresh(run, [0])
            out = run.samples[0].output()
            self.out.write(f"\n[{render.stopped_note(out)}]\n" if render.was_stopped(out) else "\n")
        else:
            for s in run.samples:
                out = s.output()
                note = f"\n[{render.stopped_note(out)}]" if render.was_stopped(out) else ""
                self.out.write(f"--- {s.label}\n{s.text}{note}\n")
        self.out.write(f"[{render.stats_line(run.stats(), self.model, final=True)}]\n")
        self.out.flush()


def make_view(fmt: str, model: str, params: dict, ui: str = "auto", extra_meta: dict | None = None) -> Any:
    """``ui``: "auto" (widgets in a kernel where ipywidgets is installed), "widget", "text", "terminal"."""
    if ui not in ("auto", "widget", "text", "terminal"):
        raise ValueError(f"ui must be one of auto, widget, text, terminal; got {ui!r}.")
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    terminal = shell is None or type(shell).__name__ == "TerminalInteractiveShell"
    if ui == "terminal" or (ui == "auto" and terminal):
        return TerminalView(fmt, model, params)
    if ui == "widget" and not widgets_available():
        raise ValueError("ui='widget' needs ipywidgets (pip install ipywidgets).")
    in_kernel = getattr(shell, "kernel", None) is not None
    widgets = ui == "widget" or (ui == "auto" and in_kernel and widgets_available())
    return NotebookView(fmt, model, params, widgets, extra_meta)

"""The live engine dashboard (``%nbengine dashboard``): load, KV cache, prefix-cache hits, tokens/s, recent requests.

A small daemon thread refreshes an ``ipywidgets.HTML`` about twice a second while other cells run
(it sends a message only when what it shows changed: an idle engine costs nothing). Each refresh
reads ``get_server_info()`` — the engine answers between two steps with counters it already
keeps, so no step waits for it — plus the per-second token counts and the recent requests, which
are copies read without involving the engine thread at all. It stops when closed (its button,
:meth:`Dashboard.close`, ``%nbengine shutdown``) or when its engine shuts down; the last picture
stays in the notebook as static HTML. Without ipywidgets it shows one snapshot.
"""

from __future__ import annotations

import html
import threading
import time
from typing import Any

REFRESH_S = 0.5  # ~2 refreshes a second
RECENT_SHOWN = 8
_DASH = "—"


def snapshot(llm: Any) -> dict[str, Any]:
    """What the dashboard shows, from the engine's public API."""
    info = llm.get_server_info()
    history = llm.get_throughput_history(60)
    return {
        "num_running_reqs": info["num_running_reqs"],
        "num_waiting_reqs": info["num_waiting_reqs"],
        "num_finished_reqs": info["num_finished_reqs"],
        "kv_pages_used": info["kv_pages_used"],
        "kv_pages_total": info["kv_pages_total"],
        "kv_token_usage": info["kv_token_usage"],
        # prefix caching (the radix cache) reports these where it is built; "—" where it is not
        "cache_hit_rate": info.get("cache_hit_rate"),
        "cached_tokens_total": info.get("cached_tokens_total"),
        "gen_throughput_1m": sum(history) / len(history) if history else 0.0,
        "history": history,
        "recent": llm.get_recent_requests()[-RECENT_SHOWN:],
        "model": str(info.get("model_path", "")).rstrip("/").rsplit("/", 1)[-1],
        "device": f"{info.get('device')}, {info.get('dtype')}",
    }


def _pct(x: float | None) -> str:
    return _DASH if x is None else f"{100 * x:.1f} %"


def _num(x: Any, fmt: str = "{}") -> str:
    return _DASH if x is None else fmt.format(x)


def sparkline(values: list[int], width: int = 240, height: int = 40) -> str:
    """Tokens per second over the window as an inline SVG bar chart (static: survives saving)."""
    top = max(values) if values and max(values) > 0 else 1
    w = width / max(1, len(values))
    bars = "".join(f'<rect x="{i * w:.1f}" y="{height - height * v / top:.1f}" width="{max(w - 1, 1):.1f}" '
                   f'height="{height * v / top:.1f}" fill="#4c8bf5"/>' for i, v in enumerate(values) if v)
    return (f'<svg class="nbe-spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'style="background: #f3f5f9; border-radius: 3px;">{bars}</svg>')


def render_html(snap: dict[str, Any], title: str = "", live: bool = True) -> str:
    cells = [
        ("running", str(snap["num_running_reqs"])),
        ("waiting", str(snap["num_waiting_reqs"])),
        ("finished", str(snap["num_finished_reqs"])),
        ("KV cache", f'{_pct(snap["kv_token_usage"])} ({snap["kv_pages_used"]}/{snap["kv_pages_total"]} pages)'),
        ("prefix-cache hits", _pct(snap["cache_hit_rate"])),
        ("cached tokens", _num(snap["cached_tokens_total"])),
        ("tokens/s (1 min)", f'{snap["gen_throughput_1m"]:.1f}'),
    ]
    stat = "".join(f'<div class="nbe-stat" data-key="{html.escape(k)}" style="display: inline-block; margin: 0 14px 4px 0;">'
                   f'<div style="font-size: 11px; opacity: 0.7;">{html.escape(k)}</div>'
                   f'<div style="font-size: 15px; font-weight: 600;">{html.escape(v)}</div></div>' for k, v in cells)
    rows = "".join(
        "<tr>" + "".join(f"<td style='padding: 0 8px 0 0;'>{html.escape(c)}</td>" for c in (
            r["rid"][:8], str(r["prompt_tokens"]), str(r["completion_tokens"]),
            _num(r["ttft_s"] and 1000 * r["ttft_s"], "{:.0f} ms"), _num(r["tok_per_s"], "{:.1f}"),
            r["finish_reason"] or "")) + "</tr>"
        for r in reversed(snap["recent"]))
    head = "".join(f"<th style='text-align: left; padding: 0 8px 0 0; font-weight: 500;'>{h}</th>"
                   for h in ("request", "prompt", "output", "TTFT", "tok/s", "finish"))
    table = (f'<table class="nbe-recent" style="font-size: 12px; border-collapse: collapse;"><tr>{head}</tr>{rows}</table>'
             if rows else '<div style="font-size: 12px; opacity: 0.7;">no finished requests yet</div>')
    state = "live" if live else "stopped"
    return (f'<div class="nbe-dashboard" style="font-family: var(--jp-ui-font-family, sans-serif); '
            f'border: 1px solid #d0d7e2; border-radius: 4px; padding: 6px 10px;">'
            f'<div style="font-size: 12px; opacity: 0.8; margin-bottom: 4px;">nbengine · {html.escape(title)} · '
            f'{html.escape(snap["device"])} · <span class="nbe-state">{state}</span></div>{stat}'
            f'<div style="font-size: 11px; opacity: 0.7; margin-top: 2px;">tokens per second, last minute '
            f'(max {max(snap["history"] or [0])})</div>{sparkline(snap["history"])}'
            f'<div style="margin-top: 6px;">{table}</div></div>')


def render_text(snap: dict[str, Any]) -> str:
    return (f'running {snap["num_running_reqs"]} · waiting {snap["num_waiting_reqs"]} · '
            f'KV {_pct(snap["kv_token_usage"])} · prefix-cache hits {_pct(snap["cache_hit_rate"])} · '
            f'{snap["gen_throughput_1m"]:.1f} tok/s (1 min) · {snap["num_finished_reqs"]} finished')


class Dashboard:
    """A live view of one engine. ``show()`` displays it and starts refreshing; ``close()`` stops it."""

    def __init__(self, llm: Any, title: str | None = None, interval: float = REFRESH_S) -> None:
        if not 0.05 <= interval <= 60:
            raise ValueError(f"interval must be between 0.05 and 60 seconds, got {interval!r}.")
        self.llm = llm
        self.title = title or snapshot(llm)["model"]
        self.interval = interval
        self.num_refreshes = 0  # widget updates sent
        self.cpu_s = 0.0  # CPU time the refresh thread used (snapshots + rendering), for the overhead benchmark
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._html = self._box = None
        self._last = ""

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        snap = snapshot(self.llm)
        return {"text/html": render_html(snap, self.title, live=False), "text/plain": render_text(snap)}

    def show(self, widgets: bool | None = None) -> "Dashboard":
        """Display it: the live widget where ipywidgets is installed, else one static snapshot."""
        from IPython.display import display

        from .views import widgets_available

        if widgets is None:
            widgets = widgets_available()
        if not widgets:
            display(self)
            return self
        display(self.start())
        return self

    def start(self) -> Any:
        """Build the widget and start refreshing it (not displayed); returns the widget."""
        import ipywidgets as w

        self._last = render_html(snapshot(self.llm), self.title)
        self._html = w.HTML(value=self._last)
        button = w.Button(description="Close", icon="times", layout=w.Layout(width="auto"),
                          tooltip="Stop refreshing (the last picture stays)")
        button.on_click(lambda _: self.close())
        self._box = w.VBox([self._html, button])
        self._box.add_class("nbengine-dashboard")
        self._thread = threading.Thread(target=self._loop, name="nbengine-dashboard", daemon=True)
        self._thread.start()
        return self._box

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Stop refreshing; the widget keeps its last picture (marked stopped)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        from ..errors import EngineDeadError, EngineShutdownError

        snap = None
        while not self._stop.wait(self.interval):
            t0 = time.thread_time()
            try:
                snap = snapshot(self.llm)
            except (EngineShutdownError, EngineDeadError):
                break
            self._send(render_html(snap, self.title))
            self.cpu_s += time.thread_time() - t0
        if snap is not None:
            self._send(render_html(snap, self.title, live=False))
        elif self._html is not None:
            self._send(self._last.replace('class="nbe-state">live<', 'class="nbe-state">stopped<'))
        if self._box is not None and len(self._box.children) > 1:
            self._box.children = (self._html,)  # the Close button goes; the picture stays

    def _send(self, text: str) -> None:
        if text != self._last:
            self._last = text
            self._html.value = text
            self.num_refreshes += 1

"""nbengine's notebook layer: ``%load_ext nbengine`` magics, live streaming views, progress bars.

Also: ``show_tokens`` (token probabilities), ``compare`` (side by side), ``Branches`` (forks of a
generation) and ``Dashboard`` (the live engine view). Built on the public ``Engine`` API only.
Importing this package is cheap and has no side effect beyond the guarded nest-asyncio patch
inside a running kernel; magics are registered only by ``load_ipython_extension``. Works without
ipywidgets (plain display then).
"""

from __future__ import annotations

from typing import Any

from . import asyncio_patch
from .asyncio_patch import apply_in_kernel

_loaded: dict[int, Any] = {}  # id(shell) -> NBEngineMagics


def load_ipython_extension(ip: Any) -> None:
    """Register ``%%generate``, ``%%chat``, ``%nbengine`` and the batch progress bar."""
    from .. import hooks
    from .magics import NBEngineMagics
    from .progress import batch_progress

    if id(ip) in _loaded:
        return
    if not apply_in_kernel() and not asyncio_patch.decided():
        _retry_at_first_cell(ip)  # loaded at kernel start (Binder's config), before the loop runs
    magics = NBEngineMagics(ip)
    ip.register_magics(magics)
    _loaded[id(ip)] = magics
    hooks.add_batch_observer(batch_progress)


def _retry_at_first_cell(ip: Any) -> None:
    def before_cell(*_: Any) -> None:
        apply_in_kernel()
        if asyncio_patch.decided():
            ip.events.unregister("pre_run_cell", before_cell)

    ip.events.register("pre_run_cell", before_cell)


def unload_ipython_extension(ip: Any) -> None:
    """Remove the magics and the progress bar, and shut down the engines the magics started."""
    from .. import hooks
    from .progress import batch_progress

    magics = _loaded.pop(id(ip), None)
    if magics is None:
        return
    for kind, names in magics.magics.items():
        for name in names:
            ip.magics_manager.magics[kind].pop(name, None)
    ip.magics_manager.registry.pop(type(magics).__name__, None)
    magics.close_dashboards()
    magics.registry.shutdown_all()
    if not _loaded:
        hooks.remove_batch_observer(batch_progress)


def stream(llm: Any, prompt: str | list[str], sampling_params: dict | None = None, **kwargs: Any) -> dict | list[dict]:
    """Generate with the live view and return the output dict(s); see :func:`nbengine.notebook.api.stream`."""
    from .api import stream as _stream

    return _stream(llm, prompt, sampling_params, **kwargs)


def current_engine() -> Any:
    """The engine the magics use now (``%nbengine use``), started on first use like ``%%generate`` does."""
    if not _loaded:
        raise ValueError("The nbengine extension is not loaded: run %load_ext nbengine, or pass an Engine.")
    return next(iter(_loaded.values())).registry.get(None)[1]


_LAZY = {"show_tokens": "probs", "compare": "side_by_side", "Branches": "branches", "Dashboard": "dashboard"}


def __getattr__(name: str) -> Any:
    """``show_tokens``, ``compare``, ``Branches``, ``Dashboard``: imported on first use (keeps import cheap)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["load_ipython_extension", "unload_ipython_extension", "stream", "apply_in_kernel", "current_engine",
           "show_tokens", "compare", "Branches", "Dashboard"]

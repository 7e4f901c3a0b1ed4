"""Automatic nest-asyncio inside a Jupyter kernel, so pasted ``asyncio.run(main())`` cells just work.

A kernel runs its own asyncio loop on the main thread, so ``asyncio.run`` or
``loop.run_until_complete`` in a cell raises "cannot be called from a running event loop".
Other engines' docs are full of such cells; we apply ``nest_asyncio2`` (the maintained fork of
the archived ``nest_asyncio``) once, only where a kernel's loop is running, and only to that
loop. The engine itself never needs it: it runs its own loop in its own thread.

``NBENGINE_NEST_ASYNCIO=0`` opts out. Loops nest_asyncio2 cannot patch (uvloop) are left alone
with a one-line warning.
"""

from __future__ import annotations

import asyncio
import os
import sys
import warnings

_state = {"done": False, "patched": False}


def in_kernel() -> bool:
    """True inside an IPython kernel (not terminal IPython, not a plain script)."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def decided() -> bool:
    """Whether the patch was applied or declined for good (outside a running kernel loop: not yet)."""
    return _state["done"]


def is_patched() -> bool:
    return _state["patched"]


def apply_in_kernel() -> bool:
    """Patch the running kernel loop once; returns whether it is patched. Cheap to call again."""
    if _state["done"]:
        return _state["patched"]
    if os.environ.get("NBENGINE_NEST_ASYNCIO", "1").strip().lower() in ("0", "false", "no", "off"):
        _state["done"] = True
        return False
    if not in_kernel():
        return False  # maybe later: nbengine imported before the kernel started its loop
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    _state["done"] = True
    if type(loop).__module__.startswith("uvloop"):
        warnings.warn(f"nbengine: not applying nest-asyncio to a {type(loop).__name__} loop (it cannot be "
                      "patched); asyncio.run() in a cell will not work, use `await` instead.", stacklevel=2)
        return False
    try:
        import nest_asyncio2
    except ImportError:
        warnings.warn("nbengine: nest-asyncio2 is not installed, so asyncio.run() in a cell will not work "
                      "(pip install nest-asyncio2, or use `await` instead).", stacklevel=2)
        return False
    try:
        nest_asyncio2.apply(loop)
    except ValueError as e:  # "Can't patch loop of type ..."
        warnings.warn(f"nbengine: nest-asyncio not applied ({e}); use `await` instead of asyncio.run() in cells.",
                      stacklevel=2)
        return False
    _state["patched"] = True
    return True

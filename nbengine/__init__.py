"""nbengine: an LLM inference engine that lives inside a notebook kernel."""

import sys as _sys

from .errors import (EngineDeadError, EngineShutdownError, InsufficientMemoryError, ModelNotFoundError,
                     NBEngineError, UnsupportedModelError)
from .sampling_params import SamplingParams

__version__ = "0.1.0"


def load_ipython_extension(ip):
    """``%load_ext nbengine``: the magics of :mod:`nbengine.notebook` (importing nbengine registers nothing)."""
    from .notebook import load_ipython_extension as load

    load(ip)


def unload_ipython_extension(ip):
    from .notebook import unload_ipython_extension as unload

    unload(ip)


if "ipykernel" in _sys.modules:  # in a kernel: let pasted asyncio.run(...) cells work (guarded, once)
    from .notebook.asyncio_patch import apply_in_kernel as _apply

    _apply()


def __getattr__(name: str):
    # importing torch is slow; load the engine on first use
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["Engine", "SamplingParams", "NBEngineError", "EngineDeadError", "EngineShutdownError",
           "InsufficientMemoryError", "ModelNotFoundError", "UnsupportedModelError", "__version__"]

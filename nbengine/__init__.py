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
def _kernels_from_checkout() -> None:
    """``nbengine.kernels`` lives in the top-level ``kernels/`` folder. An installed wheel has it in
    place (pyproject maps it); a checkout on ``sys.path`` (or an editable install) loads it from
    beside this package, so a worktree never picks up another checkout's kernels."""
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    src = here.parent / "kernels" / "__init__.py"
    if (here / "kernels").is_dir() or not src.is_file() or f"{__name__}.kernels" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(f"{__name__}.kernels", src,
                                                  submodule_search_locations=[str(src.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module  # as a normal submodule import would bind it on the package


_kernels_from_checkout()


def __getattr__(name: str):
    # importing torch is slow; load the engine on first use
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["Engine", "SamplingParams", "NBEngineError", "EngineDeadError", "EngineShutdownError",
           "InsufficientMemoryError", "ModelNotFoundError", "UnsupportedModelError", "__version__"]

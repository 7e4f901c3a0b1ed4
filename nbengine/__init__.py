"""nbengine: an LLM inference engine that lives inside a notebook kernel."""

from .errors import (EngineDeadError, EngineShutdownError, InsufficientMemoryError, ModelNotFoundError,
                     NBEngineError, UnsupportedModelError)
from .sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # importing torch is slow; load the engine on first use
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["Engine", "SamplingParams", "NBEngineError", "EngineDeadError", "EngineShutdownError",
           "InsufficientMemoryError", "ModelNotFoundError", "UnsupportedModelError", "__version__"]

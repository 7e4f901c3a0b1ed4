"""Exception hierarchy shared by every part of nbengine."""

from __future__ import annotations

__all__ = [
    "NBEngineError",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "EngineDeadError",
    "EngineShutdownError",
    "InsufficientMemoryError",
]


class NBEngineError(Exception):
    """Base class for errors raised by nbengine."""


class ModelNotFoundError(NBEngineError, FileNotFoundError):
    """The model could not be found or downloaded."""


class UnsupportedModelError(NBEngineError, ValueError):
    """The model's architecture or format is not supported."""


class EngineDeadError(NBEngineError, RuntimeError):
    """The engine thread died; the engine cannot serve requests any more."""


class EngineShutdownError(NBEngineError, RuntimeError):
    """The engine was shut down; create a new Engine to continue."""


class InsufficientMemoryError(NBEngineError, MemoryError):
    """The device has too little free memory for the model's KV pool."""

"""Observers the engine tells about a batch ``generate`` call (start, each finished request, end).

Generic on purpose: the engine knows nothing about who listens. The notebook layer registers a
progress bar here when its extension loads; anyone else may register a logger or a meter.
An observer factory is called as ``factory(total)`` on the caller's thread when a non-streaming
batch starts and returns an object with ``advance(n)`` and ``close()``, or ``None`` to sit this
one out. A failing observer is logged and dropped for that call; it never fails the generate.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

logger = logging.getLogger("nbengine")


class BatchObserver(Protocol):
    def advance(self, n: int) -> None: ...

    def close(self) -> None: ...


BatchObserverFactory = Callable[[int], "BatchObserver | None"]

_factories: list[BatchObserverFactory] = []


def add_batch_observer(factory: BatchObserverFactory) -> None:
    """Call ``factory(total)`` at the start of every non-streaming batch ``generate``."""
    if factory not in _factories:
        _factories.append(factory)


def remove_batch_observer(factory: BatchObserverFactory) -> None:
    if factory in _factories:
        _factories.remove(factory)


class _Batch:
    """The observers of one batch call; each one's failure is contained."""

    def __init__(self, observers: list[BatchObserver]) -> None:
        self._observers = observers

    def advance(self, n: int = 1) -> None:
        for ob in list(self._observers):
            try:
                ob.advance(n)
            except Exception:  # noqa: BLE001 - an observer must not fail the generate call
                logger.warning("batch observer %r failed; dropping it for this call", ob, exc_info=True)
                self._observers.remove(ob)

    def close(self) -> None:
        for ob in self._observers:
            try:
                ob.close()
            except Exception:  # noqa: BLE001
                logger.warning("batch observer %r failed to close", ob, exc_info=True)
        self._observers = []


def batch_started(total: int) -> _Batch:
    observers = []
    for factory in list(_factories):
        try:
            ob = factory(total)
        except Exception:  # noqa: BLE001
            logger.warning("batch observer factory %r failed", factory, exc_info=True)
            continue
        if ob is not None:
            observers.append(ob)
    return _Batch(observers)

"""Where a ``generate`` call's outputs go: the engine thread delivers them, the caller's thread (or event loop)
waits for them and turns each into the user's dict."""

from __future__ import annotations

import asyncio
import queue
from typing import Any, Callable

from .request_output import RequestOutput


def as_output(out: RequestOutput | BaseException) -> dict:
    """The user's dict, built here on the caller's thread; an error for this request is raised."""
    if isinstance(out, BaseException):
        raise out
    return out.to_dict()


class OutputSink:
    """Where the outputs of one ``generate`` call go. The engine thread hands over all the outputs of a step
    for one call with one ``deliver`` (one wake-up of the waiting thread or loop per step, not one per token);
    outside a step each output goes alone through its request's ``emit``."""

    def __init__(self, put: Callable[[list[tuple[int, Any]]], None]) -> None:
        self.deliver = put

    def __call__(self, i: int) -> Callable[[Any], None]:
        def emit(out: RequestOutput | BaseException) -> None:
            self.deliver([(i, out)])
        emit.sink, emit.index = self, i  # type: ignore[attr-defined]
        return emit


def queue_sink(q: queue.Queue) -> OutputSink:
    """Outputs of a call to a waiting thread: each ``put`` is a list of ``(index, output)``."""
    return OutputSink(q.put)


def async_sink(loop: asyncio.AbstractEventLoop, q: asyncio.Queue) -> OutputSink:
    """Outputs of a call to a waiting event loop: one ``call_soon_threadsafe`` per delivery."""
    return OutputSink(lambda items: loop.call_soon_threadsafe(q.put_nowait, items))

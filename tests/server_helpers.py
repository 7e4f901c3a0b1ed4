"""Helpers shared by the server tests: waiting on engine state, recording aborts, raw SSE reads."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

import httpx


def wait_until(pred, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``pred`` (an event, not a timing check: the bound is generous for a busy 2-core machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def engine_idle(llm) -> bool:
    info = llm.get_server_info()
    return info["kv_pages_used"] == 0 and info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0


@contextmanager
def recorded_aborts(llm):
    """The rids the engine core is asked to abort while the block runs."""
    core = llm._thread.core
    seen: list = []
    original = core.abort

    def abort(rid, *args, **kwargs):
        seen.append(rid)
        return original(rid, *args, **kwargs)

    core.abort = abort
    try:
        yield seen
    finally:
        del core.abort


def sse_events(response: httpx.Response) -> list:
    """The JSON events of a finished SSE response, and "[DONE]" where it appears."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metric(text: str, name: str) -> float:
    """The value of one sample line ``name value`` (name with its labels) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)

"""Helpers shared by the server tests: raw SSE reads, Prometheus samples, and the API tests' waits."""

from __future__ import annotations

import json

import httpx
from test_api import is_idle as engine_idle, recorded_aborts, wait_until  # noqa: F401 - shared with the API tests


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

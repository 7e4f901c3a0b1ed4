"""RequestStats: what recent requests took (TTFT, speed) and how many tokens each second produced.

For dashboards and monitors. Filled on the engine thread — one call per step, one per finished
request, each a few appends — and read from any thread as a copy, without waiting for the step:
``collections.deque`` appends and copies are atomic in CPython, and every record is a new,
never-changed object (a dict per request, a ``(second, tokens)`` tuple per second).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

MAX_RECENT = 32  # finished requests kept
WINDOW_S = 60  # seconds of per-second token counts kept


class RequestStats:
    def __init__(self, max_recent: int = MAX_RECENT, window_s: int = WINDOW_S) -> None:
        self.window_s = window_s
        self._recent: deque[dict[str, Any]] = deque(maxlen=max_recent)
        self._seconds: deque[tuple[int, int]] = deque(maxlen=window_s)  # completed seconds
        self._current: tuple[int, int] = (int(time.perf_counter()), 0)  # (second, tokens so far), replaced whole
        self.generated_tokens_total = 0

    # ------------------------------------------------------- engine thread
    def add_tokens(self, n: int) -> None:
        """``n`` tokens were sampled in this step."""
        sec = int(time.perf_counter())
        cur_sec, count = self._current
        if sec != cur_sec:
            self._seconds.append((cur_sec, count))
            self._current = (sec, n)
        else:
            self._current = (sec, count + n)
        self.generated_tokens_total += n

    def finished(self, seq: Any) -> None:
        """Record a request that just ended (any reason)."""
        now = time.perf_counter()
        first = getattr(seq, "first_token_at", None)
        n = len(seq.output_ids)
        decode_s = now - first if first is not None else None
        self._recent.append({
            "rid": seq.rid,
            "finish_reason": (seq.finish_reason or {}).get("type"),
            "prompt_tokens": len(seq.prompt_ids),
            "completion_tokens": n,
            "ttft_s": None if first is None else first - seq.arrival,
            "e2e_latency_s": now - seq.arrival,
            # decode speed: tokens after the first over the time after the first
            "tok_per_s": (n - 1) / decode_s if decode_s and n > 1 else None,
            "finished_at": time.time(),
        })

    # --------------------------------------------------------- any thread
    def recent_requests(self) -> list[dict[str, Any]]:
        """The last finished requests, oldest first (copies)."""
        return [dict(r) for r in self._recent.copy()]

    def tokens_per_second(self, seconds: int | None = None) -> list[int]:
        """Tokens sampled in each of the last ``seconds`` whole seconds, oldest first (0 where idle)."""
        seconds = min(seconds or self.window_s, self.window_s)
        cur_sec, cur = self._current  # read before the deque: a roll-over in between only duplicates a second
        counts = dict(self._seconds.copy())
        counts.setdefault(cur_sec, cur)
        now = int(time.perf_counter())
        return [counts.get(s, 0) for s in range(now - seconds, now)]

    def info(self) -> dict[str, Any]:
        window = self.tokens_per_second()
        return {"generated_tokens_total": self.generated_tokens_total,
                "gen_throughput_1m": sum(window) / len(window) if window else 0.0}

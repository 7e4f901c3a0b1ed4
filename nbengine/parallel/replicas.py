"""ReplicaSet: ``dp_size`` engine replicas behind one ``Engine``, each request sent to the least loaded.

Each replica is a whole engine (its own engine thread, KV pool and, with ``tp_size > 1``, its own
tensor-parallel workers) on its own devices: replica ``i`` starts at GPU ``i * tp_size``. The set
stands in for the single ``EngineThread`` the ``Engine`` facade talks to (``check``, ``post``,
``call``, ``live_core``), and :class:`Router` stands in for its ``EngineCore``: ``add`` routes,
``abort`` reaches every replica, ``info`` sums the counts.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any, Callable

from ..config import EngineConfig
from ..engine_thread import EngineThread
from ..errors import EngineDeadError, NBEngineError
from ..request_stats import MAX_RECENT
from ..sequence import Sequence
from ..tokenizer import Tokenizer
from .workers import rank_device

_SUMMED = ("num_running_reqs", "num_waiting_reqs", "num_finished_reqs", "num_preemptions", "kv_pages_used",
           "kv_pages_free", "kv_pages_total", "last_gen_throughput", "kv_pages_cached", "cached_tokens_total",
           "prompt_tokens_total", "generated_tokens_total", "gen_throughput_1m")


class ReplicaSet:
    def __init__(self, config: EngineConfig, model_dir: Path, tokenizer: Tokenizer | None) -> None:
        self.threads: list[EngineThread] = []
        try:
            for i in range(config.dp_size):
                device = rank_device(config, i * config.tp_size)
                cfg = dataclasses.replace(config, dp_size=1, device=device)
                self.threads.append(EngineThread(cfg, model_dir, tokenizer))
        except BaseException:
            self.stop()
            raise
        self.core = Router(self.threads)

    @property
    def dead(self) -> BaseException | None:
        return next((t.dead for t in self.threads if t.dead is not None), None)

    def check(self) -> None:
        """Dead once any replica died: the others are stopped too (their waiters get ``EngineDeadError``),
        as one engine whose thread died would be; shut down once stopped."""
        for t in self.threads:
            try:
                t.check()
            except EngineDeadError as e:
                for other in self.threads:
                    if other is not t and other.dead is None:
                        other.fail(EngineDeadError(f"another data-parallel replica died: {e}"))
                raise EngineDeadError(f"a data-parallel replica died: {e}") from None

    def alive(self) -> bool:
        try:
            self.check()  # also stops the other replicas once one died
        except NBEngineError:
            return False
        return True

    def live_core(self) -> "Router":
        self.check()
        return self.core

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        self.check()
        fn(*args)  # the router's methods post to the replicas themselves

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        self.check()
        return fn()

    def stop(self, timeout: float = 30.0) -> None:
        for t in self.threads:
            t.stop(timeout)


class Router:
    """The replicas' cores seen as one: least-loaded routing, aborts everywhere, summed counts."""

    def __init__(self, threads: list[EngineThread]) -> None:
        self.threads = threads
        self.runner = threads[0].core.runner  # model config, device (the same on every replica)
        self.load = [0] * len(threads)  # requests sent to each replica and not finished yet
        self.routed = [0] * len(threads)  # requests sent to each replica so far
        self._lock = threading.Lock()  # load is updated from the callers' and the replicas' threads

    def add(self, seqs: list[Sequence]) -> None:
        placed: dict[int, int] = {}  # id(sequence) -> its replica: the samples of one prompt (n > 1) stay together
        for seq in seqs:
            with self._lock:
                if seq.fork_of is not None and id(seq.fork_of) in placed:
                    i = placed[id(seq.fork_of)]  # it shares its first sample's prompt pages: same KV pool
                else:
                    i = min(range(len(self.threads)), key=self.load.__getitem__)
                placed[id(seq)] = i
                self.load[i] += 1
                self.routed[i] += 1
            seq.emit = self._counted(seq.emit, i)
            thread = self.threads[i]
            thread.post(thread.live_core().add, [seq])

    def _counted(self, emit: Callable[[Any], None], i: int) -> Callable[[Any], None]:
        done = False

        def counted(out: Any) -> None:
            nonlocal done
            if not done and (isinstance(out, BaseException) or out.finish_reason is not None):
                done = True
                with self._lock:
                    self.load[i] -= 1
            emit(out)

        return counted

    def abort(self, rid: str | None, message: str = "Aborted by the user") -> None:
        for t in self.threads:
            if t.alive():
                t.post(t.live_core().abort, rid, message)

    @property
    def stats(self) -> "_MergedStats":
        return _MergedStats([t.core.stats for t in self.threads])

    def flush_cache(self) -> None:
        for t in self.threads:
            t.call(t.live_core().flush_cache)

    def info(self) -> dict[str, Any]:
        infos = [t.call(t.live_core().info) for t in self.threads]
        merged = dict(infos[0])
        for key in _SUMMED:
            merged[key] = sum(i.get(key, 0) for i in infos)
        merged["cache_hit_rate"] = merged["cached_tokens_total"] / max(1, merged["prompt_tokens_total"])
        # one request runs on one replica: it must fit the smallest pool
        merged["max_total_num_tokens"] = min(i["max_total_num_tokens"] for i in infos)
        merged["kv_token_usage"] = merged["kv_pages_used"] / max(1, merged["kv_pages_total"])
        with self._lock:
            routed = list(self.routed)
        merged["replicas"] = [{"device": i["device"], "num_running_reqs": i["num_running_reqs"],
                               "num_waiting_reqs": i["num_waiting_reqs"], "requests_routed": n}
                              for i, n in zip(infos, routed)]
        return merged


class _MergedStats:
    """The replicas' request statistics read as one (each replica's are copies, read without its step)."""

    def __init__(self, stats: list[Any]) -> None:
        self._stats = stats

    def recent_requests(self) -> list[dict[str, Any]]:
        merged = sorted((r for s in self._stats for r in s.recent_requests()), key=lambda r: r["finished_at"])
        return merged[-MAX_RECENT:]

    def tokens_per_second(self, seconds: int | None = None) -> list[int]:
        return [sum(col) for col in zip(*(s.tokens_per_second(seconds) for s in self._stats))]

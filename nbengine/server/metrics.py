"""Prometheus metrics of one server (its own registry, so several servers can live in one process).

HTTP responses by endpoint and status, prompt and generated tokens, time to first token (streamed
requests), end-to-end latency, requests in flight, and the engine's KV-cache and queue state read
from ``Engine.get_server_info()`` at scrape time.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily

disable_created_metrics()  # no "*_created" series beside each counter (process-wide, as vLLM does)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class _EngineCollector:
    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def describe(self) -> list:
        return []  # collected lazily: describing would query the engine at registration

    def collect(self):
        try:
            info = self.llm.get_server_info()
        except Exception:  # noqa: BLE001 - a dead engine is reported as down, not as a scrape failure
            info = None
        yield GaugeMetricFamily("nbengine_engine_up", "1 when the engine answers, 0 when it is dead or shut down",
                                value=0 if info is None else 1)
        if info is None:
            return
        gauges = {
            "kv_cache_usage_ratio": ("fraction of KV-cache pages in use", info["kv_token_usage"]),
            "kv_cache_used_pages": ("KV-cache pages in use", info["kv_pages_used"]),
            "kv_cache_total_pages": ("KV-cache pages in the pool", info["kv_pages_total"]),
            "cache_hit_rate": ("fraction of prompt tokens served by the prefix cache", info["cache_hit_rate"]),
            "cached_tokens_total": ("prompt tokens served by the prefix cache since start", info["cached_tokens_total"]),
            "num_running_reqs": ("requests being decoded", info["num_running_reqs"]),
            "num_waiting_reqs": ("requests waiting to be scheduled", info["num_waiting_reqs"]),
            "gen_throughput": ("tokens per second sampled in the latest step", info["last_gen_throughput"]),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"nbengine_{name}", doc, value=value)


class ServerMetrics:
    def __init__(self, llm: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.http_requests = Counter("nbengine_http_requests", "HTTP responses by endpoint and status",
                                     ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("nbengine_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("nbengine_generation_tokens", "generated tokens of finished requests",
                                         registry=r)
        self.requests_finished = Counter("nbengine_requests_finished", "generation requests finished, by reason",
                                         ["finish_reason"], registry=r)
        self.ttft = Histogram("nbengine_time_to_first_token_seconds",
                              "time from request arrival to the first generated token (streamed requests)",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("nbengine_e2e_request_latency_seconds",
                                 "time from request arrival to its last token", buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("nbengine_requests_in_flight", "generation requests being served", registry=r)
        r.register(_EngineCollector(llm))

    def count_response(self, endpoint: str, status: int) -> None:
        self.http_requests.labels(endpoint, str(status)).inc()

    def track(self) -> "RequestTrack":
        return RequestTrack(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTrack:
    """One generation request's timings; ``finish`` records it once."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.start = time.perf_counter()
        self.first: float | None = None
        self.done = False
        metrics.in_flight.inc()

    def first_token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.metrics.ttft.observe(self.first - self.start)

    def finish(self, prompt_tokens: int, completion_tokens: int, finish_reasons: list[str]) -> None:
        """Record a finished request (all its choices)."""
        if self.done:
            return
        self.close()
        m = self.metrics
        m.prompt_tokens.inc(prompt_tokens)
        m.generation_tokens.inc(completion_tokens)
        for reason in finish_reasons:
            m.requests_finished.labels(reason).inc()
        m.latency.observe(time.perf_counter() - self.start)

    def close(self) -> None:
        """Leave the in-flight count (finished, failed or abandoned)."""
        if not self.done:
            self.done = True
            self.metrics.in_flight.dec()

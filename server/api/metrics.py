"""Prometheus metrics, kept in the API process.

Every response passes through the API process, and each worker event carries the state of the step
that produced it (batch size, queue depth, loaded adapters, adapter load time), so one registry here
sees everything without prometheus_client's multi-process mode.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from loraswap.server.jobs import JobEvent

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class Metrics:
    """One registry of every metric. A copy sent to another process (the spec is pickled into each worker)
    starts empty: metric objects hold locks, and only the API process's registry is ever read."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loraswap_requests",
            "Requests by route, adapter and status code.",
            ["route", "adapter", "status"],
            registry=r,
        )
        self.errors = Counter(
            "loraswap_errors",
            "Requests answered with an error, by route and adapter.",
            ["route", "adapter"],
            registry=r,
        )
        self.latency = Histogram(
            "loraswap_request_seconds",
            "Time from request to last token.",
            ["route", "adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "loraswap_time_to_first_token_seconds",
            "Time from request to first token.",
            ["route", "adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cancelled = Counter("loraswap_cancelled", "Requests dropped because the client went away.", registry=r)
        self.tokens = Counter("loraswap_generated_tokens", "Generated tokens.", ["adapter"], registry=r)
        self.prompt_tokens = Counter("loraswap_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.cached_tokens = Counter(
            "loraswap_prompt_cached_tokens",
            "Prompt tokens of finished requests whose keys and values came from the prefix cache.",
            registry=r,
        )
        self.batch = Histogram(
            "loraswap_batch_size",
            "Rows in the decoding step of each event.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.queue = Gauge("loraswap_queue_depth", "Requests waiting behind the running batch (last seen).", registry=r)
        self.loaded = Gauge("loraswap_loaded_adapters", "Adapters loaded in a worker (last seen).", registry=r)
        self.prompt_cache_bytes = Gauge(
            "loraswap_prompt_cache_bytes",
            "Keys and values of cached prompt blocks held by a worker's prefix cache (last seen).",
            registry=r,
        )
        self.load_time = Histogram(
            "loraswap_adapter_load_seconds",
            "Time to load an adapter into a worker.",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
            registry=r,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (Metrics, ())

    def event(self, ev: JobEvent) -> None:
        """The engine state a job's event carries."""
        self.batch.observe(ev.batch or 1)
        self.queue.set(ev.waiting)
        self.loaded.set(ev.loaded)
        if ev.batch:  # an event of a decoding step (error and cancel events carry no engine state)
            self.prompt_cache_bytes.set(ev.prompt_cache_bytes)
        if ev.load_ms is not None:
            self.load_time.observe(ev.load_ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics, kept in the API process.

Every response passes through the API process, and each worker event carries the state of the step
that produced it (batch size, queue depth, loaded adapters, adapter load time), so one registry here
sees everything without prometheus_client's multi-process mode.

Beside loraswap's own metrics, the gauges LoRA-aware routers read from vLLM (the Gateway API Inference Extension's
model-server protocol, llm-d): `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`
and `vllm:lora_requests_info`, computed from the requests this API process has in flight (`Inflight`). A request
waits from the moment it is queued until its first event (its prefill done), then runs until its last.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from loraswap.server.jobs import JobEvent

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


LORA_INFO_SERIES = 32
"""How many `vllm:lora_requests_info` series (one per combination of labels, the newest by value) are kept."""


class Inflight:
    """The requests in flight, by adapter (None: the base): queued and not yet started, or running."""

    def __init__(self) -> None:
        self.waiting: Tally[str | None] = Tally()
        self.running: Tally[str | None] = Tally()

    def queued(self, adapter: str | None) -> None:
        self.waiting[adapter] += 1

    def started(self, adapter: str | None) -> None:
        self._take(self.waiting, adapter)
        self.running[adapter] += 1

    def ended(self, adapter: str | None, started: bool) -> None:
        self._take(self.running if started else self.waiting, adapter)

    @staticmethod
    def _take(tally: Tally[str | None], adapter: str | None) -> None:
        tally[adapter] -= 1
        if tally[adapter] <= 0:
            del tally[adapter]

    @staticmethod
    def names(tally: Tally[str | None]) -> str:
        """vLLM's label value: the adapters' names, comma-separated without spaces (the base is not an adapter)."""
        return ",".join(sorted(n for n in tally if n is not None))


class Metrics:
    """One registry of every metric. A copy sent to another process (the spec is pickled into each worker)
    starts empty: metric objects hold locks, and only the API process's registry is ever read.

    `model_name` labels the vLLM gauges (as vLLM does, with its served model); `max_lora` is the adapters a worker
    holds at once; `capacity` the rows all workers decode together (what `vllm:kv_cache_usage_perc` divides by)."""

    def __init__(self, model_name: str = "base", max_lora: int = 1, capacity: int = 1) -> None:
        self.model_name, self.max_lora, self.capacity = model_name, max_lora, max(1, capacity)
        self.inflight = Inflight()
        self.registry = CollectorRegistry()
        r = self.registry
        self.vllm_running = Gauge(
            "vllm:num_requests_running", "Requests running (vLLM's name).", ["model_name"], registry=r
        )
        self.vllm_waiting = Gauge(
            "vllm:num_requests_waiting", "Requests waiting to start (vLLM's name).", ["model_name"], registry=r
        )
        self.vllm_kv = Gauge(
            "vllm:kv_cache_usage_perc",
            "Share of the decoding rows in use, 0 to 1 (vLLM's name for its KV-cache usage).",
            ["model_name"],
            registry=r,
        )
        self.vllm_lora = Gauge(
            "vllm:lora_requests_info",
            "Running stats on LoRA requests (vLLM's name); the value is when the labels were set.",
            ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            registry=r,
        )
        self._lora_series: dict[tuple[str, str, str], float] = {}
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

        self.pull_time = Histogram(
            "loraswap_registry_pull_seconds",
            "Time to pull an adapter from the registry into this server's cache (download, sha256, validation).",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=r,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (Metrics, (self.model_name, self.max_lora, self.capacity))

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
        self._vllm_gauges()
        return generate_latest(self.registry)

    def _vllm_gauges(self) -> None:
        """Set the vLLM gauges from the requests in flight now. `vllm:lora_requests_info` gets the current
        labels set to the current time, as vLLM does (a router takes the series with the largest value); the
        oldest series beyond LORA_INFO_SERIES are removed."""
        running, waiting = self.inflight.running, self.inflight.waiting
        n_running = sum(running.values())
        self.vllm_running.labels(self.model_name).set(n_running)
        self.vllm_waiting.labels(self.model_name).set(sum(waiting.values()))
        self.vllm_kv.labels(self.model_name).set(min(1.0, n_running / self.capacity))
        labels = (str(self.max_lora), Inflight.names(running), Inflight.names(waiting))
        now = time.time()
        self.vllm_lora.labels(*labels).set(now)
        self._lora_series[labels] = now
        while len(self._lora_series) > LORA_INFO_SERIES:
            oldest = min(self._lora_series, key=self._lora_series.__getitem__)
            del self._lora_series[oldest]
            self.vllm_lora.remove(*oldest)

"""The routing policies the fleet simulation compares: models of them, never routers that serve.

Each policy picks a replica for a request from what its router would know about the replicas (`ReplicaView`), or
none (the request waits at the router). Re-implemented from their sources:

- `RayMultiplex`: Ray Serve's model multiplexing, `python/ray/serve/_private/request_router/request_router.py`
  (`MultiplexMixin.apply_multiplex_routing`, `_get_replica_ids_with_fewest_multiplexed_models`) and
  `pow_2_router.py` (`PowerOfTwoChoicesRequestRouter.choose_replicas`), with `serve.multiplexed`'s
  `max_num_models_per_replica` LRU (`python/ray/serve/multiplex.py`). Candidates are first the replicas holding
  the model id; when there are none, or neither of the two sampled accepts, the replicas with the fewest models
  (within the matching timeout, `RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S`, drawn in [1, 2] s per
  request); after it, every replica. Two candidates are sampled at random and the one with the shorter queue
  that accepts (fewer than `max_ongoing_requests` in flight) wins; when none accepts the request waits in the
  router's FIFO and is tried again when a replica finishes one. Replicas report the ids they hold and their queue
  lengths; the model reads both live (Ray probes queue lengths per request).
- `LoraAffinity`: the Gateway API Inference Extension's endpoint picker, from
  `pkg/epp/scheduling/framework/plugins/scorer/` of kubernetes-sigs/gateway-api-inference-extension: its
  `lora-affinity-scorer` (`lora_affinity.go`: 1.0 where the adapter is among the running ones, 0.8 where running +
  waiting adapters are fewer than `max_lora`, 0.6 where it is among the waiting ones, else 0), `queue-scorer`
  (`queue.go`: (max - q) / (max - min) of the waiting queues, 1.0 when all are equal) and
  `kv-cache-utilization-scorer` (`kvcache_utilization.go`: 1 - usage), summed with weights (1 each by default, its
  test harness's profile without the prefix scorer; the LoRA scorer's weight is a parameter), then the
  `max-score-picker` (ties broken at random). It reads the model-server protocol's gauges
  (`vllm:lora_requests_info`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`) as scraped every
  `metrics_interval` seconds (its default `--refreshMetricsInterval`, 50 ms): between scrapes it routes on the
  last snapshot. Its running adapters are those with requests in flight, not those loaded: an adapter a replica
  holds idle does not count.
- `RandomPolicy`: a replica drawn uniformly.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Hashable
from dataclasses import dataclass
from typing import Literal, Protocol

PolicyName = Literal["ray", "affinity", "random"]
POLICIES: tuple[PolicyName, ...] = ("ray", "affinity", "random")


class ReplicaView(Protocol):
    """What a router can know about a replica."""

    index: int
    max_batch: int
    slots: int

    def holds(self, adapter: int) -> bool: ...  # a loaded adapter (Ray's multiplexed model ids)

    def model_count(self) -> int: ...

    def ongoing(self) -> int: ...  # requests sent and not finished (Ray's queue length)

    def snapshot(self) -> Snapshot: ...


@dataclass(frozen=True)
class Snapshot:
    """A replica's gauges as the model-server protocol exports them (what the endpoint picker scrapes)."""

    running_adapters: frozenset[int]
    waiting_adapters: frozenset[int]
    waiting: int
    kv_usage: float
    max_lora: int


class Policy(Protocol):
    name: PolicyName

    def choose(
        self, adapter: int, replicas: list[ReplicaView], now: float, key: int, since: float
    ) -> ReplicaView | None:
        """The replica for request `key`, for `adapter`, sent to the router at `since`; or None: it waits."""
        ...


@dataclass
class RandomPolicy:
    rng: random.Random
    name: PolicyName = "random"

    def choose(
        self, adapter: int, replicas: list[ReplicaView], now: float, key: int, since: float
    ) -> ReplicaView | None:
        return replicas[self.rng.randrange(len(replicas))]


@dataclass
class RayMultiplex:
    rng: random.Random
    max_ongoing: int
    """`max_ongoing_requests` of the deployment."""
    timeout: tuple[float, float] = (1.0, 2.0)
    name: PolicyName = "ray"

    def __post_init__(self) -> None:
        self._deadline: dict[int, float] = {}

    def choose(
        self, adapter: int, replicas: list[ReplicaView], now: float, key: int, since: float
    ) -> ReplicaView | None:
        deadline = self._deadline.get(key)
        if deadline is None:
            deadline = self._deadline[key] = since + self.rng.uniform(*self.timeout)
        holders = [r for r in replicas if r.holds(adapter)]
        fewest = min(r.model_count() for r in replicas)
        tiers = [holders, [r for r in replicas if r.model_count() == fewest]]
        if now >= deadline:
            tiers.append(replicas)
        for tier in tiers:
            chosen = self._two_choices(tier)
            if chosen is not None:
                self._deadline.pop(key, None)
                return chosen
        return None

    def _two_choices(self, candidates: list[ReplicaView]) -> ReplicaView | None:
        if not candidates:
            return None
        pair = candidates if len(candidates) <= 2 else self.rng.sample(candidates, 2)
        open_ = [r for r in pair if r.ongoing() < self.max_ongoing]
        if not open_:
            return None
        self.rng.shuffle(open_)  # equal queues: either
        return min(open_, key=lambda r: r.ongoing())


@dataclass
class LoraAffinity:
    rng: random.Random
    metrics_interval: float = 0.05
    """Seconds between scrapes of the replicas' gauges (0: read live)."""
    lora_weight: float = 1.0
    """The LoRA-affinity scorer's weight (the queue and KV-cache scorers weigh 1)."""
    name: PolicyName = "affinity"

    def __post_init__(self) -> None:
        self._scraped_at = -1.0
        self._snapshots: list[Snapshot] = []

    def choose(
        self, adapter: int, replicas: list[ReplicaView], now: float, key: int, since: float
    ) -> ReplicaView | None:
        if self.metrics_interval <= 0 or now - self._scraped_at >= self.metrics_interval or not self._snapshots:
            self._snapshots = [r.snapshot() for r in replicas]
            self._scraped_at = now if self.metrics_interval <= 0 else now - (now % self.metrics_interval)
        queues = [s.waiting for s in self._snapshots]
        low, high = min(queues), max(queues)
        best: list[ReplicaView] = []
        top = -1.0
        for r, s in zip(replicas, self._snapshots, strict=True):
            score = self.lora_weight * lora_affinity_score(adapter, s)
            score += 1.0 if high == low else (high - s.waiting) / (high - low)
            score += 1.0 - s.kv_usage
            if score > top + 1e-12:
                best, top = [r], score
            elif abs(score - top) <= 1e-12:
                best.append(r)
        return best[self.rng.randrange(len(best))]


def lora_affinity(
    adapter: Hashable, running: Collection[Hashable], waiting: Collection[Hashable], max_lora: int
) -> float:
    """The inference extension's LoRA-affinity score of a server for `adapter`, from the adapters it runs and queues
    and its slot count (what its vllm:lora_requests_info metric says)."""
    if adapter in running:
        return 1.0
    if len(running) + len(waiting) < max_lora:
        return 0.8
    if adapter in waiting:
        return 0.6
    return 0.0


def lora_affinity_score(adapter: int, s: Snapshot) -> float:
    """The LoRA-affinity score of a simulated replica for `adapter`."""
    return lora_affinity(adapter, s.running_adapters, s.waiting_adapters, s.max_lora)


def make_policy(
    name: PolicyName, seed: int, max_ongoing: int, metrics_interval: float, lora_weight: float = 1.0
) -> Policy:
    rng = random.Random(f"{name}-{seed}")
    if name == "ray":
        return RayMultiplex(rng, max_ongoing=max_ongoing)
    if name == "affinity":
        return LoraAffinity(rng, metrics_interval=metrics_interval, lora_weight=lora_weight)
    if name == "random":
        return RandomPolicy(rng)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")

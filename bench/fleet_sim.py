"""A discrete-event model of a fleet of loraswap replicas behind a router (`bench/fleet.py` runs it).

Each replica models one worker's engine as `server/worker/engine.py` runs it. A step admits queued requests in FIFO
order while rows are free (`max_batch`) and the prefill budget lasts; a request whose adapter is not in a LoRA slot
loads it first, into a free slot or in place of the least recently used adapter that no running request uses; when
every loaded adapter is in use the queue waits (the engine's CacheFull). The loads, then the prefill of the admitted
prompts (their first tokens), then one decoding step over every running row make the step's time: a cold load
stalls the whole batch, as it does in the engine. The prefill is the measured one of whole prompts when one of
them has just had its adapter loaded, else the one where every prompt finds its adapter's system turn in the prefix
cache (a worker keeps an adapter's prompt blocks until the adapter is evicted; the prompts are padded to the
longest, so one cold prompt costs the batch a whole prefill). Before a request reaches the engine, its replica
pulls the adapter from the registry unless its local cache holds it (beside the engine; concurrent pulls of one
adapter wait for the same one). Costs come from `fleet_costs.Costs`.

Traffic: Poisson arrivals; each request names one of `adapters` adapters drawn from a Zipf law of exponent `zipf`
(the adapter of rank k with probability proportional to 1 / k^zipf), a prompt of the measured length and
`max_tokens` generated tokens (`ignore_eos`, as `loraswap bench` sends). The requests are made once from the seed
and replayed for each policy. Metrics count the requests after the first `warmup` share, over the same window.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from loraswap.bench.fleet_costs import Costs
from loraswap.bench.fleet_policies import Policy, ReplicaView, Snapshot

RETRY_AFTER = 2.0
"""Seconds after which a request still waiting at the router is tried again (past Ray's matching timeout)."""


@dataclass(frozen=True)
class Traffic:
    adapters: int = 1000
    zipf: float = 1.0
    rate: float = 10.0
    """Arrivals per second (Poisson)."""
    requests: int = 20_000
    max_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.adapters < 1 or self.requests < 1 or self.max_tokens < 1:
            raise ValueError(f"adapters ({self.adapters}), requests, max_tokens must be >= 1")
        if self.rate <= 0 or self.zipf < 0:
            raise ValueError(f"rate ({self.rate}) must be > 0 and zipf ({self.zipf}) >= 0")


@dataclass
class Request:
    rid: int
    adapter: int
    arrival: float
    max_tokens: int
    replica: int = -1
    hit: bool = False
    """Routed to a replica that held the adapter in a slot."""
    cold: bool = False
    """Its admission loaded the adapter into a slot."""
    pulled: bool = False
    first_token: float = math.nan
    finished: float = math.nan
    tokens: int = 0


def make_requests(t: Traffic) -> list[Request]:
    rng = random.Random(t.seed)
    weights = [1.0 / (k**t.zipf) for k in range(1, t.adapters + 1)]
    cum = list(itertools.accumulate(weights))
    picks = rng.choices(range(t.adapters), cum_weights=cum, k=t.requests)
    now, out = 0.0, []
    for i, a in enumerate(picks):
        now += rng.expovariate(t.rate)
        out.append(Request(i, a, now, t.max_tokens))
    return out


@dataclass(frozen=True)
class ReplicaConfig:
    max_batch: int = 16
    """Rows decoded together (`LORASWAP_MAX_BATCH_SIZE`)."""
    slots: int = 32
    """Adapters held loaded (`LORASWAP_MAX_LOADED_ADAPTERS`, and what `LORASWAP_MAX_LOADED_BYTES` allows)."""
    disk_adapters: int = 2314
    """Adapters the registry's local cache holds (`LORASWAP_REGISTRY_CACHE_BYTES` over one adapter's bytes)."""
    max_prefill_tokens: int = 1024

    def __post_init__(self) -> None:
        if min(self.max_batch, self.slots, self.disk_adapters, self.max_prefill_tokens) < 1:
            raise ValueError(f"every bound must be >= 1: {self}")


class Replica:
    """One replica's engine, as the router sees it (`fleet_policies.ReplicaView`) and as the clock drives it."""

    def __init__(self, index: int, cfg: ReplicaConfig, costs: Costs, prompt_tokens: int) -> None:
        self.index, self.cfg, self.costs, self.prompt_tokens = index, cfg, costs, prompt_tokens
        self.max_batch, self.slots = cfg.max_batch, cfg.slots
        self.queue: deque[Request] = deque()
        self.running: list[Request] = []
        self.pulling: dict[int, list[Request]] = {}
        self.loaded: OrderedDict[int, int] = OrderedDict()  # adapter -> running requests on it; LRU first
        self.disk: OrderedDict[int, None] = OrderedDict()
        self.stepping = False
        self.loads = self.pulls = 0
        rows = range(cfg.max_batch + 1)
        self.decode_s = [costs.decode(n) for n in rows]  # by running rows: the costs' interpolation, once
        self.prefill_s = [costs.prefill(n) for n in rows]
        self.prefill_warm_s = [costs.prefill(n, warm=True) for n in rows]

    # -- what routers read ------------------------------------------------------------------------
    def holds(self, adapter: int) -> bool:
        return adapter in self.loaded

    def model_count(self) -> int:
        return len(self.loaded)

    def ongoing(self) -> int:
        return len(self.queue) + len(self.running) + sum(len(v) for v in self.pulling.values())

    def snapshot(self) -> Snapshot:
        waiting = [r.adapter for r in self.queue] + [a for a, v in self.pulling.items() for _ in v]
        return Snapshot(
            running_adapters=frozenset(r.adapter for r in self.running),
            waiting_adapters=frozenset(waiting),
            waiting=len(waiting),
            kv_usage=len(self.running) / self.max_batch,
            max_lora=self.slots,
        )

    # -- the engine -------------------------------------------------------------------------------
    def receive(self, req: Request, now: float) -> float | None:
        """Take a routed request; the time its pull ends if it needs one (None: queued for the engine now)."""
        req.replica, req.hit = self.index, self.holds(req.adapter)
        if req.adapter in self.disk:
            self.disk.move_to_end(req.adapter)
            self.queue.append(req)
            return None
        waiters = self.pulling.setdefault(req.adapter, [])
        waiters.append(req)
        if len(waiters) > 1:
            return None  # the pull under way brings it
        req.pulled = True
        self.pulls += 1
        return now + self.costs.pull_ms / 1000

    def pulled(self, adapter: int) -> None:
        self.disk[adapter] = None
        while len(self.disk) > self.cfg.disk_adapters:
            self.disk.popitem(last=False)
        self.queue.extend(self.pulling.pop(adapter))

    def step(self, now: float) -> float:
        """Run one step from `now`; its end time. Admitted requests get their first token within it."""
        self.stepping = True
        new: list[Request] = []
        spent, budget, warm = 0.0, self.cfg.max_prefill_tokens, True
        while self.queue and len(self.running) + len(new) < self.max_batch:
            if new and self.prompt_tokens > budget:
                break
            req = self.queue[0]
            if req.adapter in self.loaded:
                self.loaded.move_to_end(req.adapter)
            else:
                if len(self.loaded) >= self.slots:
                    idle = next((a for a, refs in self.loaded.items() if refs == 0), None)
                    if idle is None:
                        break  # every loaded adapter is in use: wait for a running request to finish
                    del self.loaded[idle]
                self.loaded[req.adapter] = 0
                req.cold, warm = True, False
                self.loads += 1
                spent += self.costs.load_ms / 1000
            self.queue.popleft()
            self.loaded[req.adapter] += 1
            new.append(req)
            budget -= self.prompt_tokens
        if new:
            spent += (self.prefill_warm_s if warm else self.prefill_s)[len(new)]
            for req in new:
                req.first_token, req.tokens = now + spent, 1
            self.running.extend(new)
        rows = 0
        for req in self.running:
            if req.tokens < req.max_tokens:
                req.tokens += 1
                rows += 1
        spent += self.decode_s[rows]
        return now + max(spent, 1e-9)

    def finish_step(self, now: float) -> list[Request]:
        """End the step at `now`: the requests that finished in it."""
        self.stepping = False
        done = [r for r in self.running if r.tokens >= r.max_tokens]
        if done:
            self.running = [r for r in self.running if r.tokens < r.max_tokens]
            for req in done:
                req.finished = now
                self.loaded[req.adapter] -= 1
        return done

    def has_work(self) -> bool:
        return bool(self.queue or self.running)


@dataclass
class Fleet:
    replicas: list[Replica]
    policy: Policy
    events: list[tuple[float, int, str, int]] = field(default_factory=list)
    _seq: itertools.count = field(default_factory=itertools.count)

    def at(self, when: float, kind: str, arg: int) -> None:
        heapq.heappush(self.events, (when, next(self._seq), kind, arg))


def simulate(requests: list[Request], n_replicas: int, cfg: ReplicaConfig, costs: Costs, policy: Policy,
             progress: Callable[[int], None] | None = None) -> list[Replica]:  # fmt: skip
    """Run `requests` (changed in place: replica, first token, finish) through `n_replicas` replicas routed by
    `policy`; returns the replicas (their load and pull counters). `progress` is told the requests finished."""
    if n_replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {n_replicas}")
    fleet = Fleet([Replica(i, cfg, costs, costs.prompt_tokens) for i in range(n_replicas)], policy)
    views: list[ReplicaView] = list(fleet.replicas)
    pending: deque[Request] = deque()  # waiting at the router, FIFO
    by_id = {r.rid: r for r in requests}
    for req in requests:
        fleet.at(req.arrival, "arrive", req.rid)
    finished = 0

    def route(req: Request, now: float) -> bool:
        chosen = policy.choose(req.adapter, views, now, req.rid, req.arrival)
        if chosen is None:
            return False
        replica = fleet.replicas[chosen.index]
        pull_end = replica.receive(req, now)
        if pull_end is not None:
            fleet.at(pull_end, "pulled", replica.index * len(by_id) + req.rid)
        kick(replica, now)
        return True

    def kick(replica: Replica, now: float) -> None:
        if not replica.stepping and replica.has_work():
            fleet.at(replica.step(now), "step", replica.index)

    def drain(now: float) -> None:
        while pending and route(pending[0], now):
            pending.popleft()

    while fleet.events:
        now, _, kind, arg = heapq.heappop(fleet.events)
        if kind == "arrive":
            req = by_id[arg]
            if pending or not route(req, now):
                pending.append(req)
                fleet.at(now + RETRY_AFTER, "retry", arg)
        elif kind == "retry":
            drain(now)
        elif kind == "pulled":
            replica = fleet.replicas[arg // len(by_id)]
            replica.pulled(by_id[arg % len(by_id)].adapter)
            kick(replica, now)
        else:  # a step ended
            replica = fleet.replicas[arg]
            done = replica.finish_step(now)
            kick(replica, now)
            if done:
                finished += len(done)
                drain(now)
                if progress is not None:
                    progress(finished)
    if finished != len(requests):
        raise RuntimeError(f"{len(requests) - finished} of {len(requests)} requests never finished")
    return fleet.replicas

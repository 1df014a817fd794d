"""The fleet simulation (`python -m loraswap.bench.fleet`): determinism, conservation, what each routing policy
does with adapters that fit the fleet's slots, the costs file and the CLI's JSON. Small fleets, seconds."""

from __future__ import annotations

import functools
import json
import random

import pytest

from loraswap.bench import fleet
from loraswap.bench.fleet_costs import COSTS_JSON, Costs
from loraswap.bench.fleet_policies import (
    POLICIES,
    LoraAffinity,
    RayMultiplex,
    Snapshot,
    lora_affinity_score,
    make_policy,
)
from loraswap.bench.fleet_sim import ReplicaConfig, Request, Traffic, make_requests, simulate

COSTS = Costs(
    decode_ms={1: 20.0, 4: 25.0, 8: 32.0, 16: 48.0},
    prefill_ms={1: 30.0, 4: 60.0, 16: 160.0},
    prefill_warm_ms={1: 12.0, 4: 25.0, 16: 70.0},
    load_ms=5.0,
    pull_ms=36.0,
)
CFG = ReplicaConfig(max_batch=8, slots=4)


@functools.cache
def run(policy: str, n: int = 8, adapters: int = 16, zipf: float = 0.0, load: float = 0.7, requests: int = 2000,
        seed: int = 1, cfg: ReplicaConfig = CFG) -> tuple[list[Request], dict[str, float]]:  # fmt: skip
    """One simulated run (cached: several tests read the same one; none changes it)."""
    rate = load * fleet.capacity(COSTS, cfg, 16) * n
    reqs = make_requests(Traffic(adapters, zipf, rate, requests, 16, seed))
    simulate(reqs, n, cfg, COSTS, make_policy(policy, seed, max_ongoing=2 * cfg.max_batch, metrics_interval=0.05))
    return reqs, fleet.summarize(reqs, 0.25)


@pytest.mark.parametrize("policy", POLICIES)
def test_deterministic_under_a_seed(policy: str) -> None:
    a, sa = run(policy, requests=1500)
    b, sb = run.__wrapped__(policy, requests=1500)  # run again, not from the cache
    assert a is not b and sa == sb
    assert [(r.replica, r.first_token, r.finished) for r in a] == [(r.replica, r.first_token, r.finished) for r in b]
    _, sc = run(policy, requests=1500, seed=2)
    assert sc != sa  # the seed matters


@pytest.mark.parametrize("policy", POLICIES)
def test_every_request_finishes_once_with_its_tokens(policy: str) -> None:
    reqs, summary = run(policy, zipf=1.0, adapters=200)
    assert len({r.rid for r in reqs}) == len(reqs)
    for r in reqs:
        assert r.tokens == r.max_tokens
        assert r.arrival <= r.first_token <= r.finished
        # the first token needs at least its prefill (more with a load, a pull, a queue)
        ttft = r.first_token - r.arrival
        assert ttft >= COSTS.prefill(1, warm=True) - 1e-12
        if r.cold:  # a load, then whole prompts
            assert ttft >= (COSTS.load_ms + COSTS.prefill_ms[1]) / 1000 - 1e-12
        if r.pulled:
            assert ttft >= (COSTS.pull_ms + COSTS.load_ms + COSTS.prefill_ms[1]) / 1000 - 1e-12
    assert summary["requests"] == len(reqs) - int(len(reqs) * 0.25)


@pytest.mark.parametrize("policy", POLICIES)
def test_one_adapter_has_no_cold_loads_after_warmup(policy: str) -> None:
    reqs, summary = run(policy, adapters=1)
    assert summary["cold_per_1k"] == 0
    assert summary["pulls_per_1k"] == 0
    assert sum(r.cold for r in reqs) <= 8  # one per replica at most, in the warm-up


def test_affinity_policies_beat_random_when_the_adapters_fit_the_slots() -> None:
    # 16 adapters, 8 replicas of 4 slots: room for each adapter on two replicas
    cold = {p: run(p)[1]["cold_per_1k"] for p in POLICIES}
    assert cold["ray"] < 0.5 * cold["random"], cold
    assert cold["affinity"] < 0.75 * cold["random"], cold
    hits = {p: run(p)[1]["hit_pct"] for p in ("ray", "random")}
    assert hits["ray"] >= 85 > hits["random"], hits


def test_random_spreads_and_ray_keeps_adapters_on_few_replicas() -> None:
    reqs, _ = run("ray")
    spread = {a: len({r.replica for r in reqs[1000:] if r.adapter == a}) for a in range(16)}
    reqs_r, _ = run("random")
    spread_r = {a: len({r.replica for r in reqs_r[1000:] if r.adapter == a}) for a in range(16)}
    assert sum(spread.values()) < sum(spread_r.values())


def test_slots_bound_what_a_replica_holds() -> None:
    reqs = make_requests(Traffic(50, 0.0, 40.0, 800, 8, 3))
    replicas = simulate(reqs, 2, ReplicaConfig(max_batch=8, slots=3), COSTS, make_policy("random", 3, 16, 0.05))
    assert all(len(r.loaded) <= 3 for r in replicas)
    assert sum(r.loads for r in replicas) == sum(q.cold for q in reqs)
    assert sum(r.pulls for r in replicas) == sum(q.pulled for q in reqs)


def test_zipf_draws_popular_adapters_more() -> None:
    reqs = make_requests(Traffic(100, 1.0, 10.0, 5000, 8, 0))
    counts = [sum(r.adapter == a for r in reqs) for a in range(100)]
    assert counts[0] > 3 * counts[9] > 0  # rank 1 against rank 10: about 10x
    flat = make_requests(Traffic(100, 0.0, 10.0, 5000, 8, 0))
    assert max(sum(r.adapter == a for r in flat) for a in range(100)) < counts[0]


def test_lora_affinity_score_follows_the_scorer() -> None:
    snap = Snapshot(frozenset({1, 2}), frozenset({3}), waiting=1, kv_usage=0.5, max_lora=4)
    assert lora_affinity_score(1, snap) == 1.0
    assert lora_affinity_score(9, snap) == 0.8  # 3 adapters running or waiting, max_lora 4
    full = Snapshot(frozenset({1, 2, 4}), frozenset({3}), waiting=1, kv_usage=0.5, max_lora=4)
    assert lora_affinity_score(3, full) == 0.6
    assert lora_affinity_score(9, full) == 0.0


class View:
    def __init__(self, index: int, held: set[int], ongoing: int, snap: Snapshot) -> None:
        self.index, self.max_batch, self.slots = index, 8, 4
        self._held, self._ongoing, self._snap = held, ongoing, snap

    def holds(self, adapter: int) -> bool:
        return adapter in self._held

    def model_count(self) -> int:
        return len(self._held)

    def ongoing(self) -> int:
        return self._ongoing

    def snapshot(self) -> Snapshot:
        return self._snap


def test_ray_prefers_holders_then_fewest_models_then_waits() -> None:
    idle = Snapshot(frozenset(), frozenset(), 0, 0.0, 4)
    views = [View(0, {1, 2}, 3, idle), View(1, {5}, 0, idle), View(2, {3, 4}, 0, idle)]
    ray = RayMultiplex(random.Random(0), max_ongoing=4)
    assert all(ray.choose(1, views, 0.0, i, 0.0).index == 0 for i in range(20))  # type: ignore[union-attr]
    assert all(ray.choose(7, views, 0.0, 100 + i, 0.0).index == 1 for i in range(20))  # type: ignore[union-attr]
    full = [View(0, {1}, 4, idle), View(1, {2}, 4, idle)]
    assert ray.choose(1, full, 0.0, 999, 0.0) is None  # every replica at max_ongoing_requests


def test_affinity_prefers_running_adapter_and_short_queues() -> None:
    busy = Snapshot(frozenset({1}), frozenset(), waiting=2, kv_usage=0.5, max_lora=4)
    idle = Snapshot(frozenset(), frozenset(), waiting=0, kv_usage=0.0, max_lora=4)
    views = [View(0, set(), 0, busy), View(1, set(), 0, idle)]
    pick = LoraAffinity(random.Random(0), metrics_interval=0)
    assert pick.choose(2, views, 0.0, 0, 0.0).index == 1  # type: ignore[union-attr]
    saturated = [View(0, set(), 0, busy), View(1, set(), 0, Snapshot(frozenset({2, 3, 4, 5}), frozenset(), 0, 0.9, 4))]
    assert pick.choose(1, saturated, 0.0, 1, 0.0).index == 0  # type: ignore[union-attr]


def test_committed_costs_load_and_interpolate() -> None:
    costs = Costs.load(COSTS_JSON)
    assert costs.source.get("command", "").startswith("python -m loraswap.bench.fleet")
    sizes = sorted(costs.decode_ms)
    assert costs.decode(sizes[0]) * 1000 == pytest.approx(costs.decode_ms[sizes[0]])
    mid = (sizes[-2] + sizes[-1]) // 2
    assert costs.decode_ms[sizes[-2]] <= costs.decode(mid) * 1000 <= costs.decode_ms[sizes[-1]] or (
        costs.decode_ms[sizes[-1]] <= costs.decode(mid) * 1000 <= costs.decode_ms[sizes[-2]]
    )
    with pytest.raises(ValueError, match="decode_ms"):
        Costs(decode_ms={}, prefill_ms={1: 1.0}, load_ms=1.0)


def test_cli_json_shape(capsys: pytest.CaptureFixture[str], tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "costs.json"  # type: ignore[operator]
    COSTS.save(path)
    fleet.main(["--replicas", "2,4", "--policies", "ray,random", "--adapters", "20", "--requests-per-replica", "100",
                "--costs", str(path), "--json", "--no-progress", "--max-tokens", "8",
                "--slots", "8", "--max-loaded-bytes", str(3 * COSTS.adapter_bytes)])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"config", "costs", "results"}
    assert [(r["replicas"], r["policy"]) for r in out["results"]] == [
        (2, "ray"),
        (2, "random"),
        (4, "ray"),
        (4, "random"),
    ]
    for r in out["results"]:
        assert set(fleet.COLUMNS) <= set(r)
        assert r["ttft_p95_ms"] >= r["ttft_p50_ms"] > 0
    assert out["config"]["adapters"] == 20
    assert out["config"]["replica"]["slots"] == 3  # the bytes bound is the tighter one
    assert out["costs"]["decode_ms"] == {str(k): v for k, v in COSTS.decode_ms.items()}


def test_cli_refuses_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        fleet.main(["--policies", "ray,roundrobin"])
    assert e.value.code == 2
    assert "roundrobin" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fleet.main(["--replicas", "0"])
    with pytest.raises(SystemExit):
        fleet.main(["--save-costs", "x.json"])
    with pytest.raises(SystemExit):
        fleet.main(["--max-loaded-bytes", "1000", "--replicas", "2", "--no-progress"])
    assert "holds no adapter" in capsys.readouterr().err

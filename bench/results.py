"""A run's measurements: `Collected` holds them raw, `summary()` turns them into the report's numbers (the JSON
object `loraswap bench --json` prints)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from loraswap.bench import load
from loraswap.bench.config import BenchConfig
from loraswap.bench.load import Run
from loraswap.bench.probes import histogram_quantile

THROUGHPUT = (
    "single",
    "mixed4",
    "mixed16",
    "mixed64",
    "skewed64",
    "base",
    "single_neighbour",
    "single_quota",
    "llamaserver_single",
    "llamaserver_mixed16",
    "llamaserver_mixed64",
    "llamaserver_base",
)
"""The closed-loop throughput scenarios, in the order the report and its charts list them."""


@dataclass
class Collected:
    """Everything a run measured, raw; `summary()` turns it into the report's numbers."""

    config: BenchConfig
    runs: dict[str, list[Run]] = field(default_factory=dict)
    cold: list[tuple[float, float]] = field(default_factory=list)
    """(cold TTFT, warm TTFT) in seconds, per adapter."""
    upload_to_first: list[float] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    prompt_cache: dict[str, float] = field(default_factory=dict)
    """MiB of cached prompt blocks the server reported (`loraswap_prompt_cache_bytes`) at each memory mark."""
    adapter_mb: float = 0.0
    open_loop: dict[float, tuple[float, Run]] = field(default_factory=dict)
    """fraction of capacity -> (arrival rate, run)"""
    load_histogram: list[tuple[float, float]] = field(default_factory=list)
    """The server's adapter load-time histogram at the end: (upper bound in s, cumulative count)."""
    load_sum: float = 0.0
    churn: dict[str, Any] = field(default_factory=dict)
    peer: dict[str, Any] = field(default_factory=dict)
    """llama-server as the run started it (binary, version, threads, slots), or why it did not run."""
    machine: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, name: str, run: Run) -> None:
        self.runs.setdefault(name, []).append(run)


def summary(c: Collected) -> dict[str, Any]:
    """The report's numbers: the JSON object `loraswap bench --json` prints."""
    mixes = ("short_with_long", "llamaserver_short_with_long")
    scen: dict[str, Any] = {name: load.summarize(runs) for name, runs in c.runs.items() if name not in mixes}
    for mix in (m for m in mixes if m in c.runs):
        runs = c.runs[mix]
        scen[mix] = load.summarize(runs, tag="short")
        # What the long requests streamed while the short ones ran (most are still running when they are done).
        wall = sum(run.wall for run in runs)
        scen[mix]["long_streamed_tok_s"] = (
            round(sum(run.background_streamed for run in runs) / wall, 2) if wall else None
        )
        longs = load.summarize(runs, tag="long")
        if longs["requests"]:  # long requests still running when the short ones were done are not counted
            scen[mix.replace("short_with_long", "long_with_short")] = longs
    for frac, (rate, run) in sorted(c.open_loop.items()):
        scen[f"open{round(frac * 100)}"] = load.summarize([run]) | {"offered_req_s": round(rate, 3)}

    def ratio(a: str, b: str, key: str = "tok_s") -> float | None:
        x, y = scen.get(a, {}).get(key), scen.get(b, {}).get(key)
        return round(x / y, 3) if x and y else None

    ratios = {
        "mixed16_vs_single": ratio("mixed16", "single"),
        "mixed64_vs_single": ratio("mixed64", "single"),
        "single_vs_naive": ratio("single", "naive"),
        "skewed64_vs_single": ratio("skewed64", "single"),
        "mixed4_vs_single": ratio("mixed4", "single"),
        "mixed16_vs_naive": ratio("mixed16", "naive"),
        "single_vs_base": ratio("single", "base"),
        "short_p50_with_long_vs_alone": ratio("short_with_long", "short_alone", "p50_ms"),
        "single_vs_llamacpp": ratio("single", "llamacpp"),
        "single_with_neighbour_vs_single": ratio("single_neighbour", "single"),
        "single_ttft_p50_with_neighbour_vs_single": ratio("single_neighbour", "single", "ttft_p50_ms"),
        "single_in_quota_vs_single": ratio("single_quota", "single"),
    }
    # Against llama-server on the same requests: throughput, time to first token, short requests beside long ones.
    twins = ("single", "mixed16", "mixed64", "base")
    ratios |= {f"{name}_vs_llamaserver": ratio(name, f"llamaserver_{name}") for name in twins}
    ratios |= {f"{n}_ttft_p50_vs_llamaserver": ratio(n, f"llamaserver_{n}", "ttft_p50_ms") for n in twins}
    ratios["llamaserver_short_p50_with_long_vs_alone"] = ratio(
        "llamaserver_short_with_long", "llamaserver_short_alone", "p50_ms"
    )
    ratios["short_p50_with_long_vs_llamaserver"] = ratio("short_with_long", "llamaserver_short_with_long", "p50_ms")
    cold = sorted(1000 * (a - b) for a, b in c.cold)
    up = [1000 * u for u in c.upload_to_first]
    memory: dict[str, Any] = {}
    if c.memory:
        memory = {"worker_rss_mb": c.memory, "adapter_file_mb": round(c.adapter_mb, 2)}
        counts = sorted(int(k) for k in c.memory if k != "0")
        if len(counts) >= 2 and counts[-1] > counts[0]:
            lo, hi = counts[0], counts[-1]
            per = (c.memory[str(hi)] - c.memory[str(lo)]) / (hi - lo)
            memory["mb_per_loaded_adapter"] = round(per, 2)
            memory["per_adapter_vs_file"] = round(per / c.adapter_mb, 2) if c.adapter_mb else None
            if str(hi) in c.prompt_cache and str(lo) in c.prompt_cache:
                # Every warm-up request also leaves its prompt's blocks in the prefix cache: held apart from the
                # adapter's own memory, which is what is left of the resident growth.
                cached = (c.prompt_cache[str(hi)] - c.prompt_cache[str(lo)]) / (hi - lo)
                memory["prompt_cache_mb"] = c.prompt_cache
                memory["prompt_cache_mb_per_loaded_adapter"] = round(cached, 3)
                memory["adapter_mb_per_loaded_adapter"] = round(per - cached, 2)
                memory["adapter_vs_file"] = round((per - cached) / c.adapter_mb, 2) if c.adapter_mb else None
                # Between each pair of marks: where the prefix cache is at its bound, the growth is the adapters'.
                memory["intervals"] = [
                    {
                        "from": a,
                        "to": b,
                        "mb_per_adapter": round((c.memory[str(b)] - c.memory[str(a)]) / (b - a), 2),
                        "prompt_cache_mb_per_adapter": round(
                            (c.prompt_cache[str(b)] - c.prompt_cache[str(a)]) / (b - a), 2
                        ),
                    }
                    for a, b in itertools.pairwise(counts)
                    if str(a) in c.prompt_cache and str(b) in c.prompt_cache
                ]

    return {
        "scenarios": scen,
        # Tokens/s of each round's slice, in round order: where a scenario sits in the rotation shows here.
        "rounds": {
            name: [load.summarize([run])["tok_s"] for run in c.runs[name]] for name in THROUGHPUT if name in c.runs
        },
        "ratios": ratios,
        "cold_load_ms": _server_loads(c),
        "cold_extra_ttft_ms": {
            "p50": load.percentile(cold, 50, 1),
            "p95": load.percentile(cold, 95, 1),
            "n": len(cold),
        },
        "cold_ttft_ms": {
            "p50": load.percentile([1000 * a for a, _ in c.cold], 50, 1),
            "warm_p50": load.percentile([1000 * b for _, b in c.cold], 50, 1),
        },
        "upload_to_first_token_ms": {
            "p50": load.percentile(up, 50, 1),
            "p95": load.percentile(up, 95, 1),
            "n": len(up),
        },
        "memory": memory,
        "churn": c.churn,
        "llamaserver": c.peer,
        "machine": c.machine,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(c.config).items() if "key" not in k},
        "seconds": round(c.seconds, 1),
    }


def _server_loads(c: Collected) -> dict[str, Any]:
    """Adapter load times as the server measured them (unloaded adapter to ready, in ms)."""
    n = int(max((count for _, count in c.load_histogram), default=0))
    if not n:
        return {"p50": None, "p95": None, "mean": None, "n": 0}
    p50, p95 = histogram_quantile(c.load_histogram, 0.5), histogram_quantile(c.load_histogram, 0.95)
    return {
        "p50": None if p50 is None else round(1000 * p50, 1),
        "p95": None if p95 is None else round(1000 * p95, 1),
        "mean": round(1000 * c.load_sum / n, 1),
        "n": n,
    }


def latencies(c: Collected) -> Iterator[tuple[str, list[float]]]:
    """(scenario, request latencies in ms) for the CDF chart."""
    for name in (*THROUGHPUT, "naive"):
        runs = c.runs.get(name, [])
        yield name, [1000 * r.latency for run in runs for r in run.results if r.latency is not None and not r.error]

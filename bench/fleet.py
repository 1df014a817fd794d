"""Simulate a fleet of loraswap replicas past one machine's size, and compare how routers place adapters on it.

    python -m loraswap.bench.fleet [--replicas 8,16,32,64] [--policies ray,affinity,random] [--adapters 1000]
        [--zipf 1.0] [--load 0.7 | --rate REQ_S] [--requests-per-replica 2000] [--max-tokens 64] [--slots 32]
        [--max-loaded-bytes 1073741824] [--cache-bytes 4294967296]
        [--max-batch 16] [--max-ongoing 32] [--metrics-interval 0.05] [--lora-weight 1] [--warmup 0.25] [--seed 0]
        [--costs FILE | --measure [--save-costs FILE]] [--out DIR] [--json]

A discrete-event simulation (`fleet_sim.py`): Poisson arrivals of requests over `--adapters` adapters with Zipf
popularity, each replica one engine with its LoRA slots, its registry cache and the step, prefill and load costs
measured on loraswap's engine (`fleet_costs.py`: the committed `fleet_costs.json`, or `--measure` now). The
routers are models of Ray Serve's model multiplexing, of the Gateway API Inference Extension's LoRA-affinity
scoring, and random placement (`fleet_policies.py`). `--load` sets arrivals as a share of the fleet's nominal
capacity (every replica's full batch decoding `--max-tokens` tokens a request), so the fleet grows with its
traffic. Reported per policy and replica count, over the requests after the `--warmup` share: cold loads (an
adapter loaded into a slot) and pulls from the registry per 1,000 requests, the share routed to a replica that
held the adapter, time to first token p50/p95 and generated tokens/s. `--out` gets `report.md`, `results.json`
and `fleet.png`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from loraswap.bench.fleet_costs import COSTS_JSON, Costs, machine, measure
from loraswap.bench.fleet_policies import POLICIES, PolicyName, make_policy
from loraswap.bench.fleet_sim import ReplicaConfig, Request, Traffic, make_requests, simulate

COLUMNS = ("cold_per_1k", "pulls_per_1k", "hit_pct", "ttft_p50_ms", "ttft_p95_ms", "tok_s", "requests")


def capacity(costs: Costs, cfg: ReplicaConfig, max_tokens: int) -> float:
    """A replica's nominal requests/s: a full batch decoding, each request joining alone (one warm prefill of one
    prompt, which stalls the batch) and leaving after `max_tokens - 1` decoding steps."""
    batch = cfg.max_batch
    return batch / ((max_tokens - 1) * costs.decode(batch) + batch * costs.prefill(1, warm=True))


def summarize(requests: list[Request], warmup: float) -> dict[str, float]:
    """Metrics over the requests after the first `warmup` share (by arrival). `busiest`: the requests the busiest
    replica served over the mean of the replicas that served any."""
    kept = requests[int(len(requests) * warmup) :]
    if not kept:
        raise ValueError(f"warmup {warmup} leaves no request to measure")
    ttft = sorted(r.first_token - r.arrival for r in kept)
    span = max(r.finished for r in kept) - kept[0].arrival
    n = len(kept)
    per_replica = Counter(r.replica for r in kept)
    return {
        "cold_per_1k": 1000 * sum(r.cold for r in kept) / n,
        "pulls_per_1k": 1000 * sum(r.pulled for r in kept) / n,
        "hit_pct": 100 * sum(r.hit for r in kept) / n,
        "ttft_p50_ms": 1000 * _pct(ttft, 50),
        "ttft_p95_ms": 1000 * _pct(ttft, 95),
        "tok_s": sum(r.tokens for r in kept) / span,
        "busiest": max(per_replica.values()) * len(per_replica) / n,
        "requests": n,
    }


def _pct(sorted_values: list[float], p: float) -> float:
    i = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[i]


def run(args: argparse.Namespace, costs: Costs, say: Any = print) -> dict[str, Any]:
    slots = min(args.slots, args.max_loaded_bytes // costs.adapter_bytes)  # the engine's LRU: count and bytes
    if slots < 1:
        raise ValueError(f"--max-loaded-bytes {args.max_loaded_bytes} holds no adapter of {costs.adapter_bytes} bytes")
    cfg = ReplicaConfig(max_batch=args.max_batch, slots=slots,
                        disk_adapters=max(1, args.cache_bytes // costs.adapter_bytes))  # fmt: skip
    per_replica = capacity(costs, cfg, args.max_tokens)
    results: list[dict[str, Any]] = []
    for n in args.replicas:
        rate = args.rate if args.rate else args.load * per_replica * n
        traffic = Traffic(args.adapters, args.zipf, rate, args.requests_per_replica * n, args.max_tokens, args.seed)
        for name in args.policies:
            requests = make_requests(traffic)
            policy = make_policy(name, args.seed, args.max_ongoing, args.metrics_interval, args.lora_weight)
            start, shown = time.perf_counter(), [0]

            def progress(
                done: int, n: int = n, name: str = name, total: int = len(requests), shown: list[int] = shown
            ) -> None:
                if 10 * done // total > shown[0]:  # every tenth
                    shown[0] = 10 * done // total
                    say(f"  {n} replicas, {name}: {done:,}/{total:,} requests", file=sys.stderr)

            replicas = simulate(requests, n, cfg, costs, policy, progress if args.progress else None)
            row = {"replicas": n, "policy": name, "rate": rate, **summarize(requests, args.warmup)}
            row["loads"] = sum(r.loads for r in replicas)
            row["sim_seconds"] = round(time.perf_counter() - start, 2)
            results.append(row)
    return {
        "config": {
            "adapters": args.adapters,
            "zipf": args.zipf,
            "load": None if args.rate else args.load,
            "rate": args.rate,
            "requests_per_replica": args.requests_per_replica,
            "max_tokens": args.max_tokens,
            "warmup": args.warmup,
            "seed": args.seed,
            "max_ongoing": args.max_ongoing,
            "metrics_interval": args.metrics_interval,
            "lora_weight": args.lora_weight,
            "replica": asdict(cfg),
            "replica_capacity_req_s": per_replica,
        },
        "costs": costs.to_json(),
        "results": results,
    }


def markdown(out: dict[str, Any]) -> str:
    lines = [
        "| replicas | policy | cold loads / 1k | pulls / 1k | routed to a holder | TTFT p50 | TTFT p95 | tokens/s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["results"]:
        lines.append(
            f"| {r['replicas']} | {r['policy']} | {r['cold_per_1k']:.1f} | {r['pulls_per_1k']:.1f} | "
            f"{r['hit_pct']:.1f}% | {r['ttft_p50_ms']:,.0f} ms | {r['ttft_p95_ms']:,.0f} ms | {r['tok_s']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def chart(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("cold_per_1k", "cold loads per 1,000 requests"), ("ttft_p95_ms", "TTFT (ms): p95 solid, p50 dashed"),
              ("tok_s", "generated tokens/s per replica")]  # fmt: skip
    for ax, (key, title) in zip(axes, panels, strict=True):
        for name in dict.fromkeys(r["policy"] for r in out["results"]):
            rows = [r for r in out["results"] if r["policy"] == name]
            xs = [r["replicas"] for r in rows]
            ys = [r[key] / (r["replicas"] if key == "tok_s" else 1) for r in rows]
            line = ax.plot(xs, ys, marker="o", label=name)[0]
            if key == "ttft_p95_ms":
                ax.plot(xs, [r["ttft_p50_ms"] for r in rows], ls="--", marker=".", color=line.get_color())
                ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["replicas"] for r in out["results"]}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("replicas")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    c = out["config"]
    load = f"load {c['load']}" if c["load"] is not None else f"{c['rate']} req/s"
    fig.suptitle(f"{c['adapters']} adapters, Zipf {c['zipf']}, {load}, {c['replica']['slots']} slots per replica")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _policies(text: str) -> list[PolicyName]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in POLICIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown policies {bad or text!r}; choose from {', '.join(POLICIES)}")
    return names  # type: ignore[return-value]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--replicas", type=_ints, default=[8, 16, 32, 64], help="replica counts, comma-separated")
    ap.add_argument("--policies", type=_policies, default=list(POLICIES), help="ray, affinity, random")
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--zipf", type=float, default=1.0, help="popularity exponent (0: uniform)")
    ap.add_argument("--load", type=float, default=0.7, help="arrivals as a share of the fleet's nominal capacity")
    ap.add_argument(
        "--rate", type=float, default=0.0, help="arrivals per second, whatever the fleet (overrides --load)"
    )
    ap.add_argument("--requests-per-replica", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--max-batch", type=int, default=16, help="rows per replica (LORASWAP_MAX_BATCH_SIZE)")
    ap.add_argument("--slots", type=int, default=32, help="adapters loaded per replica (LORASWAP_MAX_LOADED_ADAPTERS)")
    ap.add_argument("--max-loaded-bytes", type=int, default=1 << 30, help="LORASWAP_MAX_LOADED_BYTES")
    ap.add_argument("--cache-bytes", type=int, default=4 << 30, help="registry cache (LORASWAP_REGISTRY_CACHE_BYTES)")
    ap.add_argument("--max-ongoing", type=int, default=32, help="Ray's max_ongoing_requests per replica")
    ap.add_argument("--metrics-interval", type=float, default=0.05, help="the endpoint picker's scrape period (s)")
    ap.add_argument("--lora-weight", type=float, default=1.0, help="the LoRA-affinity scorer's weight (others: 1)")
    ap.add_argument("--warmup", type=float, default=0.25, help="share of the requests left out of the metrics")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--costs", type=Path, default=COSTS_JSON, help="measured costs (JSON)")
    ap.add_argument("--measure", action="store_true", help="measure the costs on the engine first (minutes on a CPU)")
    ap.add_argument("--save-costs", type=Path, help="with --measure: write the measured costs here")
    ap.add_argument("--out", type=Path, help="write report.md, results.json and fleet.png here")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    if args.adapters < 1 or args.requests_per_replica < 1 or args.max_tokens < 2:
        ap.error("--adapters and --requests-per-replica must be >= 1, --max-tokens >= 2")
    if not 0 <= args.warmup < 1 or (not args.rate and args.load <= 0) or args.rate < 0:
        ap.error("--warmup must be in [0, 1), --load or --rate positive")
    if args.save_costs and not args.measure:
        ap.error("--save-costs needs --measure")
    if args.measure:
        costs = measure(progress=not args.json)
        command = " ".join(["python -m loraswap.bench.fleet", *(sys.argv[1:] if argv is None else argv)])
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        costs = replace(costs, source={"command": command, "measured": when, "machine": machine(), **costs.source})
        if args.save_costs:
            costs.save(args.save_costs)
    else:
        try:
            costs = Costs.load(args.costs)
        except ValueError as e:
            ap.error(str(e))
    try:
        out = run(args, costs)
    except ValueError as e:
        ap.error(str(e))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(out, indent=2) + "\n")
        (args.out / "report.md").write_text(markdown(out))
        chart(out, args.out / "fleet.png")
    print(json.dumps(out, indent=2) if args.json else markdown(out))


if __name__ == "__main__":
    main()

"""The results as Markdown reports and PNG charts: the bench's (`write`) and the soak's (`write_soak`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraswap.bench.results import Collected, latencies

COLUMNS = ("req_s", "tok_s", "p50_ms", "p95_ms", "p99_ms", "ttft_p50_ms", "ttft_p95_ms", "errors", "requests")
WHAT = {
    "single": "one adapter for all traffic",
    "mixed4": "4 adapters, uniform",
    "mixed16": "16 adapters, uniform",
    "mixed64": "64 adapters, uniform",
    "skewed64": "64 adapters, Zipf (s=1.1)",
    "base": "base model only",
    "naive": "PEFT `set_adapter` + `generate`, one request at a time (16 adapters)",
    "short_alone": "short requests alone",
    "short_with_long": "the same short requests beside long ones",
    "long_with_short": "the long requests of that mix",
    "llamacpp": "llama.cpp on the base GGUF, single stream",
    "single_neighbour": "the single scenario's requests while another process spins on a core",
    "single_quota": "the single scenario's requests with the server in a one-CPU cgroup quota",
    "llamaserver_single": "llama-server, the single scenario's requests",
    "llamaserver_mixed16": "llama-server, the mixed16 scenario's requests",
    "llamaserver_mixed64": "llama-server, the mixed64 scenario's requests",
    "llamaserver_base": "llama-server, the base scenario's requests",
    "llamaserver_short_alone": "llama-server, the short requests alone",
    "llamaserver_short_with_long": "llama-server, the same short requests beside long ones",
    "llamaserver_long_with_short": "llama-server, the long requests of that mix",
}
GOALS = {
    "mixed16_vs_single": (">=", 0.90),
    "mixed64_vs_single": (">=", 0.85),
    "single_vs_naive": (">=", 8.0),
    "short_p50_with_long_vs_alone": ("<=", 1.5),
    "single_vs_llamacpp": (">=", 2.0),
    "single_with_neighbour_vs_single": (">=", 0.45),
    "single_ttft_p50_with_neighbour_vs_single": ("<=", 3.0),
    "mixed16_vs_llamaserver": (">=", 3.0),
    "mixed64_vs_llamaserver": (">=", 3.0),
    "single_vs_llamaserver": (">=", 1.0),
    "base_vs_llamaserver": (">=", 1.0),
    "single_ttft_p50_vs_llamaserver": ("<=", 1.0),
    "mixed16_ttft_p50_vs_llamaserver": ("<=", 1.0),
    "mixed64_ttft_p50_vs_llamaserver": ("<=", 1.0),
    "base_ttft_p50_vs_llamaserver": ("<=", 1.0),
}


def write(c: Collected, s: dict[str, Any], out: Path, command: str) -> Path:
    """report.md, results.json and the charts into `out`; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(s, indent=2) + "\n")
    charts = _charts(c, s, out)
    (out / "report.md").write_text(markdown(s, command, charts))
    return out / "report.md"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def markdown(s: dict[str, Any], command: str, charts: list[str]) -> str:
    m = s["machine"]
    cfg = s["config"]
    lines = [
        "# loraswap bench",
        "",
        f"`{command}` — {s['seconds']:.0f} s on {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB"
        + (f", {m['gpu']}" if m.get("gpu") else ", no GPU")
        + f"; torch {m['torch']} ({m['torch_threads']} threads), Python {m['python']}.",
        "",
        f"Base `{cfg['base']}` ({cfg['quant']}), LoRA path `{cfg['lora_impl'] or 'batched'}`, server batch "
        f"{cfg['max_batch_size']}, {cfg['clients']} closed-loop "
        f"clients, {cfg['max_tokens']} generated tokens per request (`ignore_eos`), {cfg['rounds']} interleaved "
        f"round(s) of {cfg['per_slice'] or 2 * cfg['clients']} requests per scenario. Adapters: rank 8 on q_proj "
        "and v_proj, random weights.",
        "",
        _peer_line(s.get("llamaserver") or {}),
        "",
        "## Ratios (same run, side by side)",
        "",
        "| ratio | measured | goal |",
        "|---|---:|---|",
    ]
    for k, v in s["ratios"].items():
        goal = GOALS.get(k)
        mark = ""
        if goal and v is not None:
            ok = v >= goal[1] if goal[0] == ">=" else v <= goal[1]
            mark = f"{goal[0]} {goal[1]} ({'met' if ok else 'not met'})"
        lines.append(f"| {k} | {_fmt(v)} | {mark} |")
    lines += ["", "## Scenarios", "", "| scenario | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in s["scenarios"].items():
        label = f"{name} ({WHAT[name]})" if name in WHAT else name
        if "offered_req_s" in row:
            label = f"{name} (Poisson arrivals at {row['offered_req_s']} req/s, 16 adapters)"
        lines.append(f"| {label} | " + " | ".join(_fmt(row.get(k)) for k in COLUMNS) + " |")
    for name, row in s["scenarios"].items():
        if row.get("error_samples"):
            lines += ["", f"{name}: errors, the most frequent first: " + "; ".join(row["error_samples"])]
        if row.get("unfinished"):
            lines += [
                "",
                f"{name}: {row['unfinished']} of {row['requests']} requests were still waiting at the deadline; "
                "they count with the time they had waited, so its latencies are lower bounds.",
            ]
    beside = s["scenarios"].get("short_with_long", {}).get("long_streamed_tok_s")
    if beside is not None:
        lines += [
            "",
            f"While the short requests ran beside the long ones, the long ones streamed {_fmt(beside)} tokens/s "
            "(text events, about one per token; most of them were still running when the short ones were done).",
        ]
    load, cold, up = s["cold_load_ms"], s["cold_extra_ttft_ms"], s["upload_to_first_token_ms"]
    lines += [
        "",
        "## Adapter cold load",
        "",
        f"- unloaded adapter to ready, as the server times it (`loraswap_adapter_load_seconds`, every load of the "
        f"run): p50 {_fmt(load['p50'])} ms, p95 {_fmt(load['p95'])} ms, mean {_fmt(load['mean'])} ms "
        f"({load['n']} loads; quantiles interpolated within histogram buckets)",
        f"- first request to a never-used adapter, extra time to first token over its second request: "
        f"p50 {_fmt(cold['p50'])} ms, p95 {_fmt(cold['p95'])} ms ({cold['n']} adapters); time to first token cold "
        f"{_fmt(s['cold_ttft_ms']['p50'])} ms vs warm {_fmt(s['cold_ttft_ms']['warm_p50'])} ms (p50)",
        f"- upload (POST /v1/adapters) to first token: p50 {_fmt(up['p50'])} ms, p95 {_fmt(up['p95'])} ms "
        f"({up['n']} uploads)",
    ]
    mem = s.get("memory") or {}
    if mem:
        rss = mem["worker_rss_mb"]
        lines += [
            "",
            "## Memory (resident, the worker process)",
            "",
            "| adapters loaded | " + " | ".join(rss) + " |",
            "|---" * (len(rss) + 1) + "|",
            "| MiB | " + " | ".join(_fmt(v) for v in rss.values()) + " |",
            "",
            f"Per loaded adapter: {_fmt(mem.get('mb_per_loaded_adapter'))} MiB for a "
            f"{_fmt(mem['adapter_file_mb'])} MiB adapter file ({_fmt(mem.get('per_adapter_vs_file'))}x). "
            "0 = the base alone, after one request.",
        ]
        if "adapter_mb_per_loaded_adapter" in mem:
            lines.append(
                f"Of which cached prompt blocks (the prefix cache's own count): "
                f"{_fmt(mem['prompt_cache_mb_per_loaded_adapter'])} MiB per adapter; the rest, "
                f"{_fmt(mem['adapter_mb_per_loaded_adapter'])} MiB, is {_fmt(mem['adapter_vs_file'])}x the file."
            )
        spans = mem.get("intervals") or []
        if spans:
            lines += [
                "",
                "| adapters loaded | " + " | ".join(f"{i['from']} -> {i['to']}" for i in spans) + " |",
                "|---" * (len(spans) + 1) + "|",
                "| MiB per adapter | " + " | ".join(_fmt(i["mb_per_adapter"]) for i in spans) + " |",
                "| of which cached prompt blocks | "
                + " | ".join(_fmt(i["prompt_cache_mb_per_adapter"]) for i in spans)
                + " |",
            ]
    churn = s.get("churn") or {}
    if churn:
        lines += [
            "",
            f"**Churn** ({churn['cycles']:,} load/evict cycles through the LoRA slots, 8 slots, in the bench process): "
            f"resident memory {_fmt(churn['rss_after_warmup_mb'])} MiB after the first 1% of cycles, "
            f"{_fmt(churn['rss_end_mb'])} MiB at the end ({churn['rss_growth_mb']:+.1f} MiB); load p50 "
            f"{_fmt(churn['load_ms_p50'])} ms, p95 {_fmt(churn['load_ms_p95'])} ms.",
        ]
    if charts:
        lines += ["", "## Charts", ""] + [f"![{c}]({c})" for c in charts]
    return "\n".join(lines) + "\n"


def _peer_line(peer: dict[str, Any]) -> str:
    """What llama-server ran as, or why it did not."""
    if not peer:
        return "llama-server: not run (--no-llama-server)."
    if "skipped" in peer:
        return f"llama-server: not run ({peer['skipped']})."
    return (
        f"llama-server ({peer['version']}) on `{peer['gguf']}`: {peer['threads']} threads, {peer['parallel']} slots "
        f"(`--parallel`, `--cont-batching`), {peer['adapters']} LoRA GGUFs loaded at scale 0, the same requests "
        "(prompt tokens, greedy, `n_predict` with `ignore_eos`) streamed from `/completion`, each slice beside "
        "loraswap's."
    )


def _save(fig: Any, out: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return name


def _charts(c: Collected, s: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    scen = s["scenarios"]

    # Throughput against the number of adapters, with the baselines as lines.
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for prefix, style, label in (("", "o-", "loraswap, uniform traffic"), ("llamaserver_", "^--", "llama-server")):
        keys = ((1, "single"), (4, "mixed4"), (16, "mixed16"), (64, "mixed64"))
        points = [(n, scen.get(prefix + k, {}).get("tok_s")) for n, k in keys]
        points = [(n, v) for n, v in points if v]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
    if scen.get("skewed64", {}).get("tok_s"):
        ax.plot([64], [scen["skewed64"]["tok_s"]], "s", label="loraswap, Zipf traffic")
    for key, style, color, label in (
        ("base", ":", "grey", "base model only"),
        ("naive", "--", "grey", "PEFT set_adapter, one at a time"),
        ("llamacpp", "-.", "grey", "llama.cpp, single stream (base)"),
        ("llamaserver_base", ":", "tab:orange", "llama-server, base model only"),
    ):
        if scen.get(key, {}).get("tok_s"):
            ax.axhline(scen[key]["tok_s"], linestyle=style, color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 4, 16, 64], ["1", "4", "16", "64"])
    ax.set_xlabel("distinct adapters in the traffic")
    ax.set_ylabel("generated tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput as adapters grow")
    ax.legend(fontsize=8)
    made.append(_save(fig, out, "throughput.png"))

    # Latency CDFs.
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, values in latencies(c):
        if values:
            xs = sorted(values)
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("request latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Latency CDF (closed loop)")
    ax.legend(fontsize=8)
    made.append(_save(fig, out, "latency_cdf.png"))

    # Cold loads and uploads.
    if c.cold or c.upload_to_first:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        series = [
            ("cold load\n(extra TTFT)", [1000 * (a - b) for a, b in c.cold]),
            ("TTFT warm", [1000 * b for _, b in c.cold]),
            ("upload to\nfirst token", [1000 * u for u in c.upload_to_first]),
        ]
        series = [(label, v) for label, v in series if v]
        ax.boxplot([v for _, v in series], vert=False, tick_labels=[label for label, _ in series])
        for i, (_, v) in enumerate(series, 1):
            ax.plot(v, [i] * len(v), "o", alpha=0.5, color="tab:blue")
        ax.set_xlabel("ms")
        ax.set_title("Adapter cold load")
        made.append(_save(fig, out, "cold_load.png"))

    # Open loop: latency against offered load.
    opens = [(row["offered_req_s"], row) for name, row in scen.items() if name.startswith("open")]
    if opens:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        opens.sort(key=lambda x: x[0])
        for key, label in (("p50_ms", "latency p50"), ("p95_ms", "latency p95"), ("ttft_p50_ms", "TTFT p50")):
            ax.plot([o[0] for o in opens], [o[1][key] or 0 for o in opens], "o-", label=label)
        ax.set_xlabel("offered load (requests/s, Poisson)")
        ax.set_ylabel("ms")
        ax.set_title("Open loop, 16 adapters")
        ax.legend(fontsize=8)
        made.append(_save(fig, out, "open_loop.png"))
    return made


def soak_markdown(s: dict[str, Any], command: str, chart: str | None) -> str:
    lines = [
        "# loraswap soak",
        "",
        f"`{command}` — {s['seconds']:.0f} s, {s['requests']:,} requests ({s['requests_after_warmup']:,} after "
        f"the warm-up), {s['config']['clients']} clients, {s['config']['adapters']} adapters.",
        "",
        f"**{'PASSED' if s['passed'] else 'FAILED'}**",
        "",
        "| check | result |",
        "|---|---|",
    ]
    lines += [f"| {name} | {'yes' if ok else 'NO'} |" for name, ok in s["checks"].items()]
    lines += ["", "| kind | requests |", "|---|---:|"]
    lines += [f"| {kind} | {n:,} |" for kind, n in s["by_kind"].items()]
    lines += ["", f"Unexpected errors: {s['unexpected_errors']}"]
    lines += [f"- {e}" for e in s["errors"][:10]]
    res = s.get("resources")
    if res:
        w, e = res["warmup"], res["end"]
        lines += [
            "",
            "## Server processes, no request in flight",
            "",
            "| | resident MiB | file descriptors | threads | processes |",
            "|---|---:|---:|---:|---:|",
            f"| after warm-up | {w['rss_mb']} | {w['fds']} | {w['threads']} | {w['processes']} |",
            f"| at the end | {e['rss_mb']} | {e['fds']} | {e['threads']} | {e['processes']} |",
            "",
            f"Resident memory change: {res['rss_growth_pct']:+.2f}%.",
            "",
            "| role | MiB (warm-up → end) | fds | threads |",
            "|---|---|---|---|",
        ]
        later = {p["pid"]: p for p in res["processes_end"]}
        for a in res["processes_warmup"]:
            b = later.get(a["pid"], {"rss_mb": "-", "fds": "-", "threads": "-"})
            lines.append(
                f"| {a['role']} | {a['rss_mb']} → {b['rss_mb']} | {a['fds']} → {b['fds']} | "
                f"{a['threads']} → {b['threads']} |"
            )
    if chart:
        lines += ["", f"![{chart}]({chart})"]
    return "\n".join(lines) + "\n"


def write_soak(s: dict[str, Any], out: Path, command: str) -> Path:
    """soak.json, soak.md and the memory chart into `out`; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(s, indent=2) + "\n")
    chart = None
    if s["samples"]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.6))
        ax.plot([p["t"] for p in s["samples"]], [p["rss_mb"] for p in s["samples"]], "o-", ms=3)
        ax.axvline(s["seconds"] * s["config"]["warmup_fraction"], color="grey", linestyle=":", label="end of warm-up")
        ax.set_xlabel("seconds")
        ax.set_ylabel("resident MiB, all server processes")
        ax.set_ylim(bottom=0)
        ax.set_title("Soak: server memory under mixed traffic, uploads and deletes")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "soak_memory.png", dpi=120)
        plt.close(fig)
        chart = "soak_memory.png"
    (out / "soak.md").write_text(soak_markdown(s, command, chart))
    return out / "soak.md"

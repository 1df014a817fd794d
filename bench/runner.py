"""`loraswap bench`: every scenario against one server, interleaved in rounds so they compare on a noisy machine.

A run: synthesise adapters (random weights, real shapes) and upload them through the API; warm up
(touching every adapter once, measuring the server's memory at 1, 16 and 64 loaded); then R rounds,
each running a slice of every scenario in a rotated order; then open-loop load at fractions of the
measured capacity; then the in-process baselines (PEFT's plain recipe, llama.cpp when installed).
Throughput figures of a scenario are its summed slices; ratios are taken between scenarios of the
same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from loraswap.bench import load
from loraswap.bench.load import Job, Result, Run

THROUGHPUT = ("single", "mixed4", "mixed16", "mixed64", "skewed64", "base")


@dataclass
class BenchConfig:
    url: str | None = None
    """A running server to measure; None starts one (and stops it at the end)."""
    base: str = "embedded"
    quant: str = "nf4"
    double_quant: bool = True
    """4-bit only: bitsandbytes double quantization."""
    max_batch_size: int = 16
    lora_impl: str | None = None
    """LoRA path of the server started here (None: the server's default)."""
    clients: int = 16
    """Concurrent clients of the closed-loop scenarios."""
    max_tokens: int = 64
    rounds: int = 3
    per_slice: int | None = None
    """Requests per scenario per round (closed loop); None: two per client."""
    adapters: int = 64
    naive_per_round: int = 2
    cold_per_round: int = 4
    uploads_per_round: int = 2
    short_tokens: int = 16
    long_tokens: int = 256
    shorts_per_round: int = 6
    short_clients: int = 2
    rates: tuple[float, ...] = (0.25, 0.5, 0.75)
    """Open-loop arrival rates, as fractions of the measured single-adapter capacity."""
    open_loop_requests: int = 16
    churn_cycles: int = 10_000
    """Adapter load/evict cycles of the in-process churn test (0: skip)."""
    reference: bool = True
    """Run llama.cpp when llama-cpp-python is installed."""
    api_key: str | None = None
    admin_key: str | None = None
    seed: int = 0

    @classmethod
    def quick(cls, **kw: Any) -> BenchConfig:
        """Every scenario, small: under 3 minutes on 2 CPU cores."""
        small = {
            "max_tokens": 16,
            "rounds": 1,
            "per_slice": kw.get("clients", 8),
            "naive_per_round": 2,
            "cold_per_round": 3,
            "uploads_per_round": 2,
            "short_tokens": 8,
            "long_tokens": 64,
            "shorts_per_round": 4,
            "rates": (0.5,),
            "open_loop_requests": 6,
            "churn_cycles": 500,
        }
        return cls(**{**small, **kw})


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
    machine: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, name: str, run: Run) -> None:
        self.runs.setdefault(name, []).append(run)


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_bench(cfg: BenchConfig) -> Collected:
    from loraswap.adapters.base import resolve_base
    from loraswap.bench.launch import launch_with_log, stop
    from loraswap.bench.synth import synth_lora

    t0 = time.perf_counter()
    out = Collected(cfg, machine=machine_info())
    ref = resolve_base(cfg.base)
    with tempfile.TemporaryDirectory(prefix="loraswap-bench-") as tmp:
        work = Path(tmp)
        names = [f"bench-{i:02d}" for i in range(cfg.adapters)]
        cold = [f"bench-cold-{i:02d}" for i in range(cfg.cold_per_round * cfg.rounds)]
        uploads = [f"bench-up-{i:02d}" for i in range(cfg.uploads_per_round * cfg.rounds)]
        say(f"synthesising {len(names) + len(cold) + len(uploads)} rank-8 adapters for {ref.base_id}")
        folders = {n: synth_lora(ref, work / "synth" / n, seed=i + 1) for i, n in enumerate(names + cold + uploads)}
        out.adapter_mb = sum(f.stat().st_size for f in folders[names[0]].iterdir()) / 2**20
        proc = None
        url = cfg.url
        log = open(work / "server.log", "wb")  # noqa: SIM115  # the server's output, for its lifetime
        try:
            if url is None:
                say(f"starting the server on {cfg.base} ({cfg.quant}), batch {cfg.max_batch_size}")
                env = {
                    "LORASWAP_MAX_LOADED_ADAPTERS": str(len(folders) + 8),
                    "LORASWAP_MAX_LOADED_BYTES": str(4 << 30),
                    "LORASWAP_MAX_TOKENS": str(max(cfg.max_tokens, cfg.long_tokens)),
                }
                if cfg.lora_impl:
                    env["LORASWAP_LORA_IMPL"] = cfg.lora_impl
                proc, url = launch_with_log(
                    cfg.base, work / "store", cfg.quant, cfg.max_batch_size, env, log, double_quant=cfg.double_quant
                )
            admin = httpx.Client(base_url=url, timeout=120, headers=load.auth_headers(cfg.admin_key))
            say(f"uploading {len(names) + len(cold)} adapters through POST /v1/adapters")
            for n in names + cold:
                upload(admin, n, folders[n])
            _warm_up(cfg, url, names, out, proc)
            naive = _naive(cfg, {n: folders[n] for n in names[:16]})
            for r in range(cfg.rounds):
                say(f"round {r + 1}/{cfg.rounds}")
                steps = _round(cfg, url, names, r, naive)
                steps.append(("cold", partial(_cold, cfg, url, cold[r * cfg.cold_per_round :], out)))
                fresh = uploads[r * cfg.uploads_per_round :]
                steps.append(("upload", partial(_uploads, cfg, url, admin, fresh, folders, out)))
                k = r % len(steps)
                for name, step in steps[k:] + steps[:k]:  # rotated, so no scenario always runs first
                    result = step()
                    if isinstance(result, Run):
                        out.add(name, result)
                    elif isinstance(result, list):
                        for sub, run in result:
                            out.add(sub, run)
            _open_loop(cfg, url, names, out)
            _load_times(cfg, url, out)
            if cfg.reference:
                _llama_cpp(cfg, ref, out)
            if cfg.churn_cycles:
                _churn(cfg, [folders[n] for n in names[:16]], out)
        finally:
            if proc is not None:
                stop(proc, graceful=True)
            elif url is not None:  # leave a server we did not start as we found it
                with httpx.Client(base_url=url, timeout=30, headers=load.auth_headers(cfg.admin_key)) as client:
                    for n in names + cold + uploads:
                        with contextlib.suppress(httpx.HTTPError):
                            client.delete(f"/v1/adapters/{n}")
            log.close()
    out.seconds = time.perf_counter() - t0
    return out


def upload(client: httpx.Client, name: str, folder: Path) -> None:
    from loraswap.bench.synth import archive

    r = client.post(
        "/v1/adapters",
        data={"name": name, "overwrite": "true"},
        files={"file": (f"{name}.tar.gz", archive(folder), "application/gzip")},
    )
    if r.status_code != 201:
        raise RuntimeError(f"upload of {name} failed: HTTP {r.status_code} {r.text[:300]}")


def _one(cfg: BenchConfig, url: str, adapter: str, max_tokens: int) -> Result:
    async def go() -> Result:
        async with load.client_for(url, cfg.api_key) as client:
            return await load.send(client, Job(adapter, load.QUESTIONS[0], max_tokens))

    res = asyncio.run(go())
    if res.error:
        raise RuntimeError(f"request to {adapter} failed: {res.error}")
    return res


def _warm_up(cfg: BenchConfig, url: str, names: list[str], out: Collected, proc: Any) -> None:
    """One request to the base, then one to each adapter (`clients` at a time); the server's memory
    with 0, 1, 16 and 64 adapters loaded (a server started here: its worker, the largest of its processes)."""
    say(f"warm-up: loading {len(names)} adapters")
    # A full batch on the base first, so memory for activations is at its high-water mark before measuring.
    _closed(cfg, url, [Job("base", q, 2) for q in load.QUESTIONS[: cfg.clients]])
    marks = sorted({1, *(min(m, len(names)) for m in (16, 32, 48, 64)), len(names)})
    done = 0
    if proc is not None:
        out.memory["0"] = worker_rss_mb(proc.pid)
        out.prompt_cache["0"] = prompt_cache_mb(cfg, url)
    for mark in marks:
        work = [Job(n, load.QUESTIONS[0], 1) for n in names[done:mark]]
        failed = [r.error for r in _closed(cfg, url, work).results if r.error]
        if failed:
            raise RuntimeError(f"warm-up requests failed: {failed[0]}")
        done = mark
        if proc is not None:
            out.memory[str(mark)] = worker_rss_mb(proc.pid)
            out.prompt_cache[str(mark)] = prompt_cache_mb(cfg, url)


def prompt_cache_mb(cfg: BenchConfig, url: str) -> float:
    """The cached prompt blocks the server holds, in MiB (its `loraswap_prompt_cache_bytes` gauge)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", headers=load.auth_headers(cfg.api_key), timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name == "loraswap_prompt_cache_bytes":
            return round(sum(sample.value for sample in family.samples) / 2**20, 2)
    return 0.0


def worker_rss_mb(pid: int) -> float:
    """Resident memory of the largest process under `pid` (the inference worker), in MiB."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    sizes = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            sizes.append(p.memory_info().rss)
    return round(max(sizes) / 2**20, 1)


def _round(cfg: BenchConfig, url: str, names: list[str], r: int, naive: Any) -> list[tuple[str, Callable[[], Any]]]:
    """This round's slice of every throughput scenario, as (name, run) steps."""
    seed = cfg.seed * 1000 + r * 10
    n, t = cfg.per_slice or 2 * cfg.clients, cfg.max_tokens
    traffic: dict[str, list[Job]] = {
        "single": load.jobs(names[:1], n, t, seed),
        "mixed4": load.jobs(names[:4], n, t, seed + 1),
        "mixed16": load.jobs(names[:16], n, t, seed + 2),
        "mixed64": load.jobs(names[:64], n, t, seed + 3),
        "skewed64": load.jobs(names[:64], n, t, seed + 4, weights=load.zipf_weights(min(64, len(names)))),
        "base": load.jobs(["base"], n, t, seed + 5),
    }
    steps: list[tuple[str, Callable[[], Any]]] = [
        (name, partial(_closed, cfg, url, work)) for name, work in traffic.items()
    ]
    if naive is not None:
        steps.append(("naive", partial(_in_process, naive, load.jobs(names[:16], cfg.naive_per_round, t, seed + 6))))
    steps.append(("short_long", partial(_short_long, cfg, url, names, seed + 7)))
    return steps


def _closed(cfg: BenchConfig, url: str, work: list[Job]) -> Run:
    return asyncio.run(load.closed_loop(url, work, cfg.clients, cfg.api_key))


def _in_process(engine: Any, work: list[Job]) -> Run:
    return Run(*engine.run(work))


def _naive(cfg: BenchConfig, adapters: dict[str, Path]) -> Any:
    if cfg.naive_per_round <= 0:
        return None
    from loraswap.bench.naive import Naive

    say(f"loading PEFT's plain recipe in this process ({len(adapters)} adapters, set_adapter per request)")
    return Naive(cfg.base, cfg.quant, adapters, cfg.double_quant)


def _short_long(cfg: BenchConfig, url: str, names: list[str], seed: int) -> list[tuple[str, Run]]:
    """Short requests alone, then the same short requests while long ones fill the rest of the batch."""
    shorts = load.jobs(names[:16], cfg.shorts_per_round, cfg.short_tokens, seed, tag="short")
    alone = asyncio.run(load.closed_loop(url, shorts, cfg.short_clients, cfg.api_key))
    long_clients = max(1, cfg.max_batch_size - cfg.short_clients)
    mixed = asyncio.run(
        load.with_background(
            url,
            shorts,
            cfg.short_clients,
            partial(_long_job, names[16:32] or names, cfg.long_tokens, seed),
            long_clients,
            cfg.api_key,
        )
    )
    return [("short_alone", alone), ("short_with_long", mixed)]


def _long_job(names: list[str], max_tokens: int, seed: int, i: int) -> Job:
    return load.jobs(names, 1, max_tokens, seed * 7919 + i, tag="long")[0]


def _cold(cfg: BenchConfig, url: str, fresh: list[str], out: Collected) -> None:
    """Each never-used adapter: time to first token of its first request, then of a second one."""
    for n in fresh[: cfg.cold_per_round]:
        first = _one(cfg, url, n, 1)
        again = _one(cfg, url, n, 1)
        assert first.ttft is not None and again.ttft is not None
        out.cold.append((first.ttft, again.ttft))


def _uploads(
    cfg: BenchConfig, url: str, admin: httpx.Client, fresh: list[str], folders: dict[str, Path], out: Collected
) -> None:
    """Upload an adapter and ask it a question at once: upload start to first token."""
    for n in fresh[: cfg.uploads_per_round]:
        start = time.perf_counter()
        upload(admin, n, folders[n])
        res = _one(cfg, url, n, 1)
        assert res.ttft is not None
        out.upload_to_first.append(res.start + res.ttft - start)


def _churn(cfg: BenchConfig, folders: list[Path], out: Collected) -> None:
    """Load and evict adapters `churn_cycles` times through the batched LoRA slots (in this process, on a
    fresh base): resident memory after the first 1% of cycles and at the end, and the load times."""
    import gc

    import psutil

    from loraswap.adapters.base import load_base
    from loraswap.server.worker.slots import LoraSlots

    say(f"churn: {cfg.churn_cycles} adapter load/evict cycles through the LoRA slots, in this process")
    base = load_base(cfg.base, quant=cfg.quant, double_quant=cfg.double_quant)  # type: ignore[arg-type]
    slots = LoraSlots(base.model, capacity=8)
    me = psutil.Process()
    times: list[float] = []
    warm = max(1, cfg.churn_cycles // 100)
    rss_warm = 0.0
    for i in range(cfg.churn_cycles):
        start = time.perf_counter()
        slots.load(f"c{i}", folders[i % len(folders)])
        times.append(1000 * (time.perf_counter() - start))
        if len(slots) >= 8:
            slots.unload(f"c{i - 7}")
        if i + 1 == warm:
            gc.collect()
            rss_warm = me.memory_info().rss / 2**20
    gc.collect()
    rss_end = me.memory_info().rss / 2**20

    out.churn = {
        "cycles": cfg.churn_cycles,
        "rss_after_warmup_mb": round(rss_warm, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_growth_mb": round(rss_end - rss_warm, 1),
        "load_ms_p50": load.percentile(times, 50, 2),
        "load_ms_p95": load.percentile(times, 95, 2),
    }


def _load_times(cfg: BenchConfig, url: str, out: Collected) -> None:
    """The server's own adapter load times (every load of the run: warm-up, cold, uploads), from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", headers=load.auth_headers(cfg.api_key), timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name == "loraswap_adapter_load_seconds":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    out.load_histogram.append((float(sample.labels["le"]), sample.value))
                elif sample.name.endswith("_sum"):
                    out.load_sum = sample.value


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile: the q-quantile (0-1), interpolated within its bucket."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def _open_loop(cfg: BenchConfig, url: str, names: list[str], out: Collected) -> None:
    single = load.summarize(out.runs.get("single", []))
    capacity = single["req_s"]
    if not capacity or not cfg.rates:
        return
    for i, frac in enumerate(cfg.rates):
        rate = float(capacity) * frac
        say(f"open loop: Poisson arrivals at {rate:.2f} req/s ({frac:.0%} of capacity), 16 adapters")
        work = load.jobs(names[:16], cfg.open_loop_requests, cfg.max_tokens, cfg.seed * 1000 + 500 + i)
        run = asyncio.run(load.open_loop(url, work, rate, seed=cfg.seed + i, api_key=cfg.api_key))
        out.open_loop[frac] = (rate, run)


def _llama_cpp(cfg: BenchConfig, ref: Any, out: Collected) -> None:
    from loraswap.bench.naive import LlamaCpp, llama_cpp_available

    gguf = gguf_of(cfg.base)
    if not llama_cpp_available() or gguf is None:
        why = "llama-cpp-python is not installed" if gguf else "the base has no GGUF file"
        say(f"skipping the llama.cpp reference: {why}")
        return
    from loraswap.adapters.base import load_tokenizer
    from loraswap.adapters.prompt import render_prompt

    tokenizer = load_tokenizer(ref)
    say(f"llama.cpp reference on {gguf.name}, single stream")
    engine = LlamaCpp(gguf, os.cpu_count() or 1, partial(render_prompt, tokenizer))
    for r in range(cfg.rounds):
        work = load.jobs(["base"], max(2, cfg.naive_per_round), cfg.max_tokens, cfg.seed * 1000 + 900 + r)
        out.add("llamacpp", _in_process(engine, work))


def gguf_of(base: str) -> Path | None:
    from loraswap.adapters.base import embedded_gguf_path

    if base == "embedded":
        return embedded_gguf_path()
    return Path(base) if base.endswith(".gguf") and Path(base).is_file() else None


def machine_info() -> dict[str, Any]:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        info["loraswap"] = version("loraswap")
    return info


def summary(c: Collected) -> dict[str, Any]:
    """The report's numbers: the JSON object `loraswap bench --json` prints."""
    scen: dict[str, Any] = {name: load.summarize(runs) for name, runs in c.runs.items() if name != "short_with_long"}
    if "short_with_long" in c.runs:
        runs = c.runs["short_with_long"]
        scen["short_with_long"] = load.summarize(runs, tag="short")
        # What the long requests streamed while the short ones ran (most are still running when they are done).
        wall = sum(run.wall for run in runs)
        scen["short_with_long"]["long_streamed_tok_s"] = (
            round(sum(run.background_streamed for run in runs) / wall, 2) if wall else None
        )
        longs = load.summarize(runs, tag="long")
        if longs["requests"]:  # long requests still running when the short ones were done are not counted
            scen["long_with_short"] = longs
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
    }
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

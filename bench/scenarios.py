"""The bench's scenarios: what traffic each sends and what it records.

Interleaved scenarios run a slice per round, in a rotated order (`run_round`), so none always runs first
on a noisy machine; each returns its `Run` (or named runs) and the runner adds them to the scenario's
total. A new interleaved scenario is a function here and one entry in `round_steps`; its row reaches the
report by itself (a label in `report.WHAT` describes it, a ratio in `results.summary` compares it). The
others run once: the warm-up (with the memory marks), open-loop load at fractions of the measured
capacity, the llama.cpp reference and the in-process churn test.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from loraswap.bench import cpu, load
from loraswap.bench.config import BenchConfig
from loraswap.bench.load import ANSWER, Job, Result, Run, Wire
from loraswap.bench.probes import prompt_cache_mb, worker_rss_mb
from loraswap.bench.results import Collected
from loraswap.bench.session import Session, say

Step = Callable[[], Run | list[tuple[str, Run]] | None]
"""One slice of a scenario: its run, or several named runs, or None when it records into `Collected` itself."""


@dataclass
class Bench:
    """What every scenario works with: the run's config, the server and its adapters, the measurements."""

    cfg: BenchConfig
    session: Session
    url: str
    names: list[str]
    """Adapters uploaded before the warm-up, the traffic of the mixed scenarios."""
    cold: list[str]
    """Adapters uploaded but never asked until the cold-load scenario."""
    uploads: list[str]
    """Adapters first uploaded by the upload scenario."""
    folders: dict[str, Path]
    out: Collected
    naive: Any = None
    """PEFT's plain recipe loaded in this process (None: not measured)."""
    quota: bool = False
    """Run the single scenario inside a one-CPU cgroup quota too (a server started here, cgroups writable)."""
    peer_url: str = ""
    """llama-server, running the peer scenarios beside loraswap's ("": not run)."""
    peer_wire: Wire | None = None
    """How llama-server is asked (its route, body and events)."""


PEER_TWINS = ("base", "single", "mixed16", "mixed64")
"""The closed-loop scenarios that llama-server runs too, as `llamaserver_<name>` (and the short-beside-long one)."""
PEER_ONLY = {*PEER_TWINS, "short_long"}
"""The interleaved scenarios of `--peer-only` (beside their llama-server twins)."""


def round_steps(b: Bench, r: int) -> list[tuple[str, Step]]:
    """Round `r`'s slice of every interleaved scenario, as (name, step), before rotation."""
    cfg, names = b.cfg, b.names
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
    steps: list[tuple[str, Step]] = [(name, partial(closed, b, work)) for name, work in traffic.items()]
    # The single scenario's own requests again, beside a busy process and inside a one-CPU quota.
    steps.append(("single_neighbour", partial(beside_neighbour, b, traffic["single"])))
    if b.quota:
        steps.append(("single_quota", partial(in_quota, b, traffic["single"])))
    if b.naive is not None:
        steps.append(("naive", partial(in_process, b.naive, load.jobs(names[:16], cfg.naive_per_round, t, seed + 6))))
    steps.append(("short_long", partial(short_long, b, seed + 7)))
    steps.append(("cold", partial(cold_loads, b, b.cold[r * cfg.cold_per_round :])))
    steps.append(("upload", partial(uploads, b, b.uploads[r * cfg.uploads_per_round :])))
    if cfg.peer_only:
        steps = [(name, step) for name, step in steps if name in PEER_ONLY]
    if b.peer_url:  # the same requests to llama-server, right beside loraswap's as one step (first on odd rounds)
        twins: dict[str, Step] = {n: partial(closed, b, traffic[n], True) for n in PEER_TWINS}
        twins["short_long"] = partial(short_long, b, seed + 7, True)
        paired: list[tuple[str, Step]] = []
        for name, step in steps:
            if name in twins:
                pair = [(name, step), (f"llamaserver_{name}", twins[name])]
                step = partial(_both, pair[::-1] if r % 2 else pair)
            paired.append((name, step))
        steps = paired
    return steps


def _both(steps: list[tuple[str, Step]]) -> list[tuple[str, Run]]:
    """Two steps one after the other, their runs named."""
    runs: list[tuple[str, Run]] = []
    for name, step in steps:
        result = step()
        if isinstance(result, Run):
            runs.append((name, result))
        elif isinstance(result, list):
            runs += result
    return runs


def run_round(b: Bench, r: int) -> None:
    """Round `r`: every interleaved scenario's slice, rotated so no scenario always runs first."""
    steps = round_steps(b, r)
    k = r % len(steps)
    for name, step in steps[k:] + steps[:k]:
        result = step()
        if isinstance(result, Run):
            b.out.add(name, result)
        elif isinstance(result, list):
            for sub, run in result:
                b.out.add(sub, run)


def closed(b: Bench, work: list[Job], peer: bool = False) -> Run:
    """`work` from `clients` closed-loop clients (to llama-server where `peer`)."""
    url, key, wire = _target(b, peer)
    return asyncio.run(load.closed_loop(url, work, b.cfg.clients, key, wire))


def _target(b: Bench, peer: bool) -> tuple[str, str | None, Wire]:
    """(URL, API key, wire) of loraswap or, where `peer`, of llama-server."""
    if not peer:
        return b.url, b.cfg.api_key, ANSWER
    if not b.peer_url or b.peer_wire is None:
        raise RuntimeError("the peer scenarios need llama-server started (Bench.peer_url)")
    return b.peer_url, None, b.peer_wire


def beside_neighbour(b: Bench, work: list[Job]) -> Run:
    """`work` while one other process spins on a core (it starts with the slice: the server adapts meanwhile)."""
    with cpu.busy_neighbour():
        return closed(b, work)


def in_quota(b: Bench, work: list[Job]) -> Run:
    """`work` with every process of the server in a cgroup limited to one CPU, as in a container given one CPU."""
    import psutil

    if b.session.proc is None:
        raise RuntimeError("the quota scenario needs a server started by the bench")
    server = psutil.Process(b.session.proc.pid)
    pids = [server.pid] + [p.pid for p in server.children(recursive=True)]
    with cpu.cpu_quota(pids, cpus=1.0):
        return closed(b, work)


def in_process(engine: Any, work: list[Job]) -> Run:
    return Run(*engine.run(work))


def load_naive(cfg: BenchConfig, adapters: dict[str, Path]) -> Any:
    """PEFT's plain recipe over `adapters`, in this process (None when the config runs none of it)."""
    if cfg.naive_per_round <= 0:
        return None
    from loraswap.bench.naive import Naive

    say(f"loading PEFT's plain recipe in this process ({len(adapters)} adapters, set_adapter per request)")
    return Naive(cfg.base, cfg.quant, adapters, cfg.double_quant)


def warm_up(b: Bench) -> None:
    """One request to the base, then one to each adapter (`clients` at a time); the server's memory
    with 0, 1, 16 and 64 adapters loaded (a server started here: its worker, the largest of its processes)."""
    cfg, names, out, proc = b.cfg, b.names, b.out, b.session.proc
    say(f"warm-up: loading {len(names)} adapters")
    # A full batch on the base first, so memory for activations is at its high-water mark before measuring.
    closed(b, [Job("base", q, 2) for q in load.QUESTIONS[: cfg.clients]])
    marks = sorted({1, *(min(m, len(names)) for m in (16, 32, 48, 64)), len(names)})
    done = 0
    if proc is not None:
        out.memory["0"] = worker_rss_mb(proc.pid)
        out.prompt_cache["0"] = prompt_cache_mb(b.url, cfg.api_key)
    for mark in marks:
        work = [Job(n, load.QUESTIONS[0], 1) for n in names[done:mark]]
        failed = [r.error for r in closed(b, work).results if r.error]
        if failed:
            raise RuntimeError(f"warm-up requests failed: {failed[0]}")
        done = mark
        if proc is not None:
            out.memory[str(mark)] = worker_rss_mb(proc.pid)
            out.prompt_cache[str(mark)] = prompt_cache_mb(b.url, cfg.api_key)


def _one(b: Bench, adapter: str, max_tokens: int) -> Result:
    async def go() -> Result:
        async with load.client_for(b.url, b.cfg.api_key) as client:
            return await load.send(client, Job(adapter, load.QUESTIONS[0], max_tokens))

    res = asyncio.run(go())
    if res.error:
        raise RuntimeError(f"request to {adapter} failed: {res.error}")
    return res


def short_long(b: Bench, seed: int, peer: bool = False) -> list[tuple[str, Run]]:
    """Short requests alone, then the same short requests while long ones fill the rest of the batch (to
    llama-server where `peer`: its runs are named `llamaserver_short_alone` and `llamaserver_short_with_long`)."""
    cfg, names = b.cfg, b.names
    url, key, wire = _target(b, peer)
    shorts = load.jobs(names[:16], cfg.shorts_per_round, cfg.short_tokens, seed, tag="short")
    alone = asyncio.run(load.closed_loop(url, shorts, cfg.short_clients, key, wire))
    long_clients = max(1, cfg.max_batch_size - cfg.short_clients)
    mixed = asyncio.run(
        load.with_background(
            url,
            shorts,
            cfg.short_clients,
            partial(_long_job, names[16:32] or names, cfg.long_tokens, seed),
            long_clients,
            key,
            wire,
            cfg.short_deadline,
        )
    )
    prefix = "llamaserver_" if peer else ""
    return [(f"{prefix}short_alone", alone), (f"{prefix}short_with_long", mixed)]


def _long_job(names: list[str], max_tokens: int, seed: int, i: int) -> Job:
    return load.jobs(names, 1, max_tokens, seed * 7919 + i, tag="long")[0]


def cold_loads(b: Bench, fresh: list[str]) -> None:
    """Each never-used adapter: time to first token of its first request, then of a second one."""
    for n in fresh[: b.cfg.cold_per_round]:
        first = _one(b, n, 1)
        again = _one(b, n, 1)
        assert first.ttft is not None and again.ttft is not None
        b.out.cold.append((first.ttft, again.ttft))


def uploads(b: Bench, fresh: list[str]) -> None:
    """Upload an adapter and ask it a question at once: upload start to first token."""
    for n in fresh[: b.cfg.uploads_per_round]:
        start = time.perf_counter()
        b.session.upload(n, b.folders[n])
        res = _one(b, n, 1)
        assert res.ttft is not None
        b.out.upload_to_first.append(res.start + res.ttft - start)


def open_loop(b: Bench) -> None:
    """Poisson arrivals over 16 adapters at each of `rates` times the single-adapter capacity measured."""
    cfg = b.cfg
    single = load.summarize(b.out.runs.get("single", []))
    capacity = single["req_s"]
    if not capacity or not cfg.rates:
        return
    for i, frac in enumerate(cfg.rates):
        rate = float(capacity) * frac
        say(f"open loop: Poisson arrivals at {rate:.2f} req/s ({frac:.0%} of capacity), 16 adapters")
        work = load.jobs(b.names[:16], cfg.open_loop_requests, cfg.max_tokens, cfg.seed * 1000 + 500 + i)
        run = asyncio.run(load.open_loop(b.url, work, rate, seed=cfg.seed + i, api_key=cfg.api_key))
        b.out.open_loop[frac] = (rate, run)


def llama_cpp(b: Bench) -> None:
    """llama.cpp on the base's GGUF, single stream, in this process (skipped, saying why, where it cannot run)."""
    from loraswap.bench.naive import LlamaCpp, llama_cpp_available

    cfg = b.cfg
    gguf = gguf_of(cfg.base)
    if not llama_cpp_available() or gguf is None:
        why = "llama-cpp-python is not installed" if gguf else "the base has no GGUF file"
        say(f"skipping the llama.cpp reference: {why}")
        return
    from loraswap.adapters.base import load_tokenizer
    from loraswap.adapters.prompt import render_prompt

    tokenizer = load_tokenizer(b.session.ref)
    say(f"llama.cpp reference on {gguf.name}, single stream")
    engine = LlamaCpp(gguf, os.cpu_count() or 1, partial(render_prompt, tokenizer))
    for r in range(cfg.rounds):
        work = load.jobs(["base"], max(2, cfg.naive_per_round), cfg.max_tokens, cfg.seed * 1000 + 900 + r)
        b.out.add("llamacpp", in_process(engine, work))


def gguf_of(base: str) -> Path | None:
    from loraswap.adapters.base import embedded_gguf_path

    if base == "embedded":
        return embedded_gguf_path()
    return Path(base) if base.endswith(".gguf") and Path(base).is_file() else None


def churn(b: Bench) -> None:
    """Load and evict adapters `churn_cycles` times through the batched LoRA slots (in this process, on a
    fresh base): resident memory after the first 1% of cycles and at the end, and the load times."""
    import gc

    import psutil

    from loraswap.adapters.base import load_base
    from loraswap.server.worker.slots import LoraSlots

    cfg = b.cfg
    folders = [b.folders[n] for n in b.names[:16]]
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

    b.out.churn = {
        "cycles": cfg.churn_cycles,
        "rss_after_warmup_mb": round(rss_warm, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_growth_mb": round(rss_end - rss_warm, 1),
        "load_ms_p50": load.percentile(times, 50, 2),
        "load_ms_p95": load.percentile(times, 95, 2),
    }

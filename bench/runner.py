"""`loraswap bench`: every scenario against one server, interleaved in rounds so they compare on a noisy machine.

A run: synthesise adapters (random weights, real shapes) and upload them through the API; warm up
(touching every adapter once, measuring the server's memory at 1, 16 and 64 loaded); then R rounds,
each running a slice of every scenario in a rotated order; then open-loop load at fractions of the
measured capacity; then the in-process baselines (PEFT's plain recipe, llama.cpp when installed). Where
llama-server is built, it runs beside the server (`llamaserver.py`) and the same requests of the base, single,
mixed16, mixed64 and short-beside-long scenarios go to it too, each slice right beside loraswap's.
Throughput figures of a scenario are its summed slices; ratios are taken between scenarios of the
same run. The server and its adapters come from `session.py`, the scenarios from `scenarios.py`, what
is read off the server from `probes.py`; `results.summary` makes the numbers, `report.py` the report.
"""

from __future__ import annotations

import contextlib
import time

from loraswap.bench import cpu, llamaserver, scenarios
from loraswap.bench.config import BenchConfig
from loraswap.bench.probes import adapter_load_times, machine_info
from loraswap.bench.results import Collected
from loraswap.bench.session import Session, say


def run_bench(cfg: BenchConfig) -> Collected:
    t0 = time.perf_counter()
    out = Collected(cfg, machine=machine_info())
    with Session(cfg.base, cfg.url, cfg.admin_key) as session, contextlib.ExitStack() as peer:
        names = [f"bench-{i:02d}" for i in range(cfg.adapters)]
        cold = [f"bench-cold-{i:02d}" for i in range(cfg.cold_per_round * cfg.rounds)]
        uploads = [f"bench-up-{i:02d}" for i in range(cfg.uploads_per_round * cfg.rounds)]
        folders = session.synthesise(names + cold + uploads)
        out.adapter_mb = sum(f.stat().st_size for f in folders[names[0]].iterdir()) / 2**20
        env = {
            "LORASWAP_MAX_LOADED_ADAPTERS": str(len(folders) + 8),
            "LORASWAP_MAX_LOADED_BYTES": str(4 << 30),
            "LORASWAP_MAX_TOKENS": str(max(cfg.max_tokens, cfg.long_tokens)),
        }
        if cfg.lora_impl:
            env["LORASWAP_LORA_IMPL"] = cfg.lora_impl
        url = session.start(cfg.quant, cfg.max_batch_size, env, double_quant=cfg.double_quant)
        say(f"uploading {len(names) + len(cold)} adapters through POST /v1/adapters")
        for n in names + cold:
            session.upload(n, folders[n])
        bench = scenarios.Bench(cfg, session, url, names, cold, uploads, folders, out)
        no_quota = "the server was not started by the bench" if session.proc is None else cpu.quota_unavailable()
        bench.quota = no_quota is None
        if no_quota:
            say(f"skipping the single scenario in a one-CPU quota: {no_quota}")
        scenarios.warm_up(bench)
        if cfg.peer or cfg.peer_only:
            llamaserver.start_peer(bench, peer)
        if not cfg.peer_only:
            bench.naive = scenarios.load_naive(cfg, {n: folders[n] for n in names[:16]})
        for r in range(cfg.rounds):
            say(f"round {r + 1}/{cfg.rounds}")
            scenarios.run_round(bench, r)
        peer.close()  # llama-server is done: the rest runs without it
        if not cfg.peer_only:
            scenarios.open_loop(bench)
        # The server's own adapter load times: every load of the run (warm-up, cold, uploads).
        out.load_histogram, out.load_sum = adapter_load_times(url, cfg.api_key)
        if cfg.reference and not cfg.peer_only:
            scenarios.llama_cpp(bench)
        if cfg.churn_cycles and not cfg.peer_only:
            scenarios.churn(bench)
    out.seconds = time.perf_counter() - t0
    return out

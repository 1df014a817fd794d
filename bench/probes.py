"""What the bench and the soak read off a server and the machine, apart from the traffic: /metrics scrapes,
resident memory, descriptors and threads of the server's processes, and the machine's description."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

import httpx

from loraswap.bench.load import auth_headers


def _metric_families(url: str, api_key: str | None) -> Any:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", headers=auth_headers(api_key), timeout=30).text
    return text_string_to_metric_families(text)


def prompt_cache_mb(url: str, api_key: str | None) -> float:
    """The cached prompt blocks the server holds, in MiB (its `loraswap_prompt_cache_bytes` gauge)."""
    for family in _metric_families(url, api_key):
        if family.name == "loraswap_prompt_cache_bytes":
            return round(sum(sample.value for sample in family.samples) / 2**20, 2)
    return 0.0


def adapter_load_times(url: str, api_key: str | None) -> tuple[list[tuple[float, float]], float]:
    """The server's own adapter load-time histogram (`loraswap_adapter_load_seconds`): its buckets as (upper
    bound in s, cumulative count), and the sum of all load times in s."""
    buckets: list[tuple[float, float]] = []
    total = 0.0
    for family in _metric_families(url, api_key):
        if family.name == "loraswap_adapter_load_seconds":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    buckets.append((float(sample.labels["le"]), sample.value))
                elif sample.name.endswith("_sum"):
                    total = sample.value
    return buckets, total


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


def worker_rss_mb(pid: int) -> float:
    """Resident memory of the largest process under `pid` (the inference worker), in MiB."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    sizes = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            sizes.append(p.memory_info().rss)
    return round(max(sizes) / 2**20, 1)


def server_processes(pid: int, port: int | None = None) -> list[dict[str, Any]]:
    """Every process of the server started as `pid`: role, resident MiB, open descriptors, threads."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    listening_newest = None
    if port is not None:
        holders = []
        for p in procs[1:]:
            with contextlib.suppress(psutil.Error):
                if any(
                    c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in p.net_connections()
                ):
                    holders.append(p)
        if holders:  # LitServe's manager inherits the socket too; the API process is forked last
            listening_newest = max(holders, key=lambda p: p.create_time()).pid
    out = []
    for p in procs:
        try:
            cmd = " ".join(p.cmdline())
            role = (
                "main"
                if p.pid == pid
                else "worker"
                if "spawn_main" in cmd
                else "resource-tracker"
                if "resource_tracker" in cmd
                else "api"
                if p.pid == listening_newest
                else "manager"
            )
            out.append(
                {
                    "pid": p.pid,
                    "role": role,
                    "rss_mb": round(p.memory_info().rss / 2**20, 1),
                    "fds": p.num_fds(),
                    "threads": p.num_threads(),
                }
            )
        except psutil.Error:
            continue
    return out


def totals(procs: list[dict[str, Any]]) -> dict[str, float]:
    """Summed resident MiB, descriptors and threads of `server_processes`, and how many processes."""
    return {
        "rss_mb": round(sum(p["rss_mb"] for p in procs), 1),
        "fds": sum(p["fds"] for p in procs),
        "threads": sum(p["threads"] for p in procs),
        "processes": len(procs),
    }


def machine_info() -> dict[str, Any]:
    """The machine a run measured on: CPU, cores, memory, torch and its threads, Python, OS, GPU, loraswap."""
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
    from importlib.metadata import PackageNotFoundError, version

    with contextlib.suppress(PackageNotFoundError):  # run from a source tree that was not installed
        info["loraswap"] = version("loraswap")
    return info

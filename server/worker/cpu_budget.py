"""What a CPU worker may use: the CPUs of its affinity mask, no more than its cgroup's CPU quota (cgroup v2
`cpu.max`, v1 `cpu.cfs_quota_us`), or what the operator set (LORASWAP_THREADS). `threads.py` adapts the count
within this budget while the worker runs."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadBudget:
    threads: int
    """The most compute threads the worker runs."""
    reason: str
    """Where the number came from, for the start-up log."""
    fixed: bool = False
    """Set by the operator: the worker keeps exactly this many and does not adapt."""


def cgroup_cpu_quota(proc_cgroup: str, root: Path = CGROUP_ROOT) -> tuple[float, str] | None:
    """The CPU quota of the process's cgroup (the tightest of it and its ancestors), in CPUs, with the file it came
    from; None where no quota is set. `proc_cgroup` is the text of /proc/self/cgroup; cgroup v2 (`cpu.max`) and v1
    (`cpu.cfs_quota_us` / `cpu.cfs_period_us`) are both read, v2 mounted at `root` or at `root`/unified."""
    best: tuple[float, str] | None = None
    for line in proc_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            mounts = [root, root / "unified"]
            read = _v2_quota
        elif "cpu" in controllers.split(","):
            mounts = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
            read = _v1_quota
        else:
            continue
        for mount in mounts:
            for folder in _ancestors(mount, path):
                quota = read(folder)
                if quota is not None and (best is None or quota[0] < best[0]):
                    best = quota
    return best


def _ancestors(mount: Path, path: str) -> list[Path]:
    """The cgroup's folder and its parents up to the mount. Inside a container the mount is often the container's
    own cgroup while /proc/self/cgroup names a path of the host's: then only the mount itself applies."""
    if not mount.is_dir():
        return []
    folder = mount / path.strip("/")
    if not folder.is_dir():
        return [mount]
    chain = [folder]
    while folder != mount:
        folder = folder.parent
        chain.append(folder)
    return chain


def read_text(file: Path) -> str | None:
    try:
        return file.read_text().strip()
    except OSError:
        return None


def _v2_quota(folder: Path) -> tuple[float, str] | None:
    text = read_text(folder / "cpu.max")
    if not text:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max" or not period:
        return None
    return int(quota) / int(period), f"{folder / 'cpu.max'} = {text}"


def _v1_quota(folder: Path) -> tuple[float, str] | None:
    quota, period = read_text(folder / "cpu.cfs_quota_us"), read_text(folder / "cpu.cfs_period_us")
    if not quota or not period or int(quota) <= 0:
        return None
    return int(quota) / int(period), f"{folder / 'cpu.cfs_quota_us'} = {quota} per {period} us"


def thread_budget(
    setting: int | None, cpus: set[int] | None = None, proc_cgroup: str | None = None, root: Path = CGROUP_ROOT
) -> ThreadBudget:
    """How many compute threads to run: `setting` (LORASWAP_THREADS) where given, else the CPUs of the affinity
    mask, no more than the cgroup's CPU quota rounded down (at least one). Threads that wait at every barrier for
    a share of a CPU they cannot have are slower than fewer threads, so a fractional quota rounds down."""
    cpus = os.sched_getaffinity(0) if cpus is None else cpus
    if setting:
        return ThreadBudget(setting, f"LORASWAP_THREADS={setting} ({len(cpus)} CPUs in the affinity mask)", fixed=True)
    if proc_cgroup is None:
        proc_cgroup = read_text(Path("/proc/self/cgroup")) or ""
    quota = cgroup_cpu_quota(proc_cgroup, root)
    mask = f"{len(cpus)} CPU{'s' * (len(cpus) != 1)} in the affinity mask"
    if quota is None or math.floor(quota[0]) >= len(cpus):
        limit = "" if quota is None else f"; cgroup quota {quota[0]:g} CPUs ({quota[1]})"
        return ThreadBudget(len(cpus), mask + (limit or ", no cgroup CPU quota"))
    threads = max(1, math.floor(quota[0]))
    return ThreadBudget(threads, f"cgroup quota {quota[0]:g} CPUs ({quota[1]}); {mask}")

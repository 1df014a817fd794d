"""CPU pressure for the bench: a busy neighbour process, and a cgroup CPU quota around the server.

A server is rarely alone on its CPUs (a log shipper, a metrics agent, other pods of a node, a container's quota).
`busy_neighbour` runs one process that spins on a core for as long as the block lasts; `cpu_quota` moves a running
server's processes into a new cgroup limited to `cpus` CPUs (cgroup v2 `cpu.max`, or v1's CFS quota) and back out
afterwards. The quota needs a writable cgroup file system (root, or a delegated subtree); `quota_unavailable` says
why not where it is missing.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


@contextlib.contextmanager
def busy_neighbour() -> Iterator[subprocess.Popen[bytes]]:
    """One process spinning on a core (`while True: pass`) while the block runs, in a session of its own as an
    unrelated process would be: where the kernel groups each session's processes for fair scheduling (autogroup),
    a neighbour left in the bench's session would share the bench's group, whose priority then decides the test
    (a bench run at a raised priority starved the server to 11 tokens/s beside it)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    try:
        _wait_spinning(proc.pid)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _wait_spinning(pid: int, cpu_seconds: float = 0.5, timeout: float = 3.0) -> None:
    """Until process `pid` has run `cpu_seconds` on a CPU (its interpreter started, then spun), at most `timeout`
    seconds: the scenario is traffic beside a process that is busy, not one that is starting."""
    import psutil

    proc = psutil.Process(pid)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        times = proc.cpu_times()
        if times.user + times.system >= cpu_seconds:
            return
        time.sleep(0.05)


def _v2_parent(root: Path) -> Path | None:
    """The cgroup v2 folder new groups are made in (the mount's root, where it offers the cpu controller)."""
    controllers = root / "cgroup.controllers"
    if controllers.is_file() and "cpu" in controllers.read_text().split():
        return root
    return None


def _v1_parent(root: Path) -> Path | None:
    for name in ("cpu", "cpu,cpuacct"):
        if (root / name / "cpu.cfs_quota_us").is_file():
            return root / name
    return None


def quota_unavailable(root: Path = CGROUP_ROOT) -> str | None:
    """Why a quota cannot be set here, or None when it can."""
    parent = _v2_parent(root) or _v1_parent(root)
    if parent is None:
        return f"no cgroup cpu controller under {root}"
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable (needs root or a delegated cgroup)"
    return None


def _home_of(pid: int, v2: bool) -> str:
    """The cgroup path of `pid` in the hierarchy the quota uses, from /proc/PID/cgroup."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (v2 and controllers == "") or (not v2 and "cpu" in controllers.split(",")):
            return path
    return "/"


@contextlib.contextmanager
def cpu_quota(pids: list[int], cpus: float, root: Path = CGROUP_ROOT) -> Iterator[Path]:
    """Processes `pids` (every thread of each) limited together to `cpus` CPUs while the block runs; each goes
    back to the cgroup it came from afterwards and the group is removed."""
    why = quota_unavailable(root)
    v2_parent = _v2_parent(root)
    parent = v2_parent or _v1_parent(root)
    if why or parent is None:
        raise RuntimeError(f"cannot set a CPU quota: {why}")
    group = parent / f"loraswap-bench-{os.getpid()}"
    group.mkdir(exist_ok=True)
    homes = {pid: _home_of(pid, v2_parent is not None) for pid in pids}
    try:
        if v2_parent is not None:
            (group / "cpu.max").write_text(f"{round(cpus * PERIOD_US)} {PERIOD_US}\n")
        else:
            (group / "cpu.cfs_period_us").write_text(f"{PERIOD_US}\n")
            (group / "cpu.cfs_quota_us").write_text(f"{round(cpus * PERIOD_US)}\n")
        for pid in pids:
            (group / "cgroup.procs").write_text(f"{pid}\n")
        yield group
    finally:
        for pid, home in homes.items():
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):  # the process has ended
                (parent / home.strip("/") / "cgroup.procs").write_text(f"{pid}\n")
        group.rmdir()

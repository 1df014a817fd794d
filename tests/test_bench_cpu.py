"""The bench's CPU pressure: the busy neighbour, and the quota's writes on a fake cgroup tree."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from loraswap.bench.cpu import _home_of, busy_neighbour, cpu_quota, quota_unavailable


def test_the_neighbour_spins_while_the_block_runs_and_is_gone_after() -> None:
    with busy_neighbour() as proc:
        assert psutil.Process(proc.pid).status() in (psutil.STATUS_RUNNING, psutil.STATUS_SLEEPING)
        assert proc.poll() is None
        times = psutil.Process(proc.pid).cpu_times()
        assert times.user + times.system >= 0.5  # spinning before the block starts, not still starting
    assert proc.poll() is not None


def test_no_cpu_controller_says_why(tmp_path: Path) -> None:
    why = quota_unavailable(tmp_path)
    assert why is not None and "no cgroup cpu controller" in why
    with (
        pytest.raises(RuntimeError, match="cannot set a CPU quota: no cgroup cpu controller"),
        cpu_quota([os.getpid()], 1.0, root=tmp_path),
    ):
        pass


def _fake_v2(root: Path) -> None:
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.procs").write_text("")


def test_v2_quota_moves_the_processes_and_back(tmp_path: Path) -> None:
    _fake_v2(tmp_path)
    assert quota_unavailable(tmp_path) is None
    pid = os.getpid()
    home = tmp_path / _home_of(pid, v2=True).strip("/")  # where this process is in the (real) v2 hierarchy
    home.mkdir(parents=True, exist_ok=True)
    with cpu_quota([pid], 1.0, root=tmp_path) as group:
        assert group.parent == tmp_path
        assert (group / "cpu.max").read_text() == "100000 100000\n"
        assert (group / "cgroup.procs").read_text() == f"{pid}\n"
        for f in group.iterdir():  # a real cgroup's files go with its folder; the fake's must go first
            f.unlink()
    assert not group.exists()
    home = next(
        line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines() if line[:3] == "0::"
    )
    assert (tmp_path / home.strip("/") / "cgroup.procs").read_text() == f"{pid}\n"


def test_v1_quota_writes_the_cfs_quota(tmp_path: Path) -> None:
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    with cpu_quota([], 1.5, root=tmp_path) as group:
        assert group.parent == cpu
        assert (group / "cpu.cfs_quota_us").read_text() == "150000\n"
        assert (group / "cpu.cfs_period_us").read_text() == "100000\n"
        for f in group.iterdir():
            f.unlink()
    assert not group.exists()

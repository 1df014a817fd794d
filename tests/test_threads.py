"""The worker's compute threads: the budget from the affinity mask and cgroup quotas (fake cgroup trees), and the
governor's decisions from the scheduler's accounts (synthetic samples)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from loraswap.server.worker.threads import (
    CpuThreads,
    Sample,
    SchedProbe,
    ThreadGovernor,
    cgroup_cpu_quota,
    thread_budget,
)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_no_quota_uses_the_affinity_mask(tmp_path: Path) -> None:
    write(tmp_path / "cpu.max", "max 100000")
    budget = thread_budget(None, cpus={0, 1, 2, 5}, proc_cgroup="0::/\n", root=tmp_path)
    assert budget.threads == 4
    assert "4 CPUs in the affinity mask" in budget.reason and "no cgroup CPU quota" in budget.reason
    assert not budget.fixed


def test_affinity_mask_of_one_cpu(tmp_path: Path) -> None:
    assert thread_budget(None, cpus={3}, proc_cgroup="", root=tmp_path).threads == 1


def test_cgroup_v2_quota_rounds_down(tmp_path: Path) -> None:
    write(tmp_path / "kubepods" / "pod1" / "cpu.max", "150000 100000")
    budget = thread_budget(None, cpus={0, 1, 2, 3}, proc_cgroup="0::/kubepods/pod1\n", root=tmp_path)
    assert budget.threads == 1
    assert "cgroup quota 1.5 CPUs" in budget.reason and "cpu.max = 150000 100000" in budget.reason


def test_cgroup_v2_tightest_ancestor_wins(tmp_path: Path) -> None:
    write(tmp_path / "a" / "cpu.max", "200000 100000")
    write(tmp_path / "a" / "b" / "cpu.max", "max 100000")
    assert cgroup_cpu_quota("0::/a/b", tmp_path) == (2.0, f"{tmp_path / 'a' / 'cpu.max'} = 200000 100000")
    assert thread_budget(None, cpus=set(range(8)), proc_cgroup="0::/a/b", root=tmp_path).threads == 2


def test_cgroup_v2_in_hybrid_layout(tmp_path: Path) -> None:
    write(tmp_path / "unified" / "job" / "cpu.max", "100000 100000")
    assert thread_budget(None, cpus={0, 1}, proc_cgroup="0::/job", root=tmp_path).threads == 1


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    write(tmp_path / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "100000")
    write(tmp_path / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000")
    text = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"
    budget = thread_budget(None, cpus={0, 1}, proc_cgroup=text, root=tmp_path)
    assert budget.threads == 1
    assert "cpu.cfs_quota_us = 100000 per 100000 us" in budget.reason


def test_cgroup_v1_no_quota(tmp_path: Path) -> None:
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "-1")
    write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000")
    assert cgroup_cpu_quota("1:cpu:/", tmp_path) is None


def test_container_path_missing_under_mount_reads_the_mount(tmp_path: Path) -> None:
    # Inside a container /proc/self/cgroup names the host's path; the mount is the container's own cgroup.
    write(tmp_path / "cpu.max", "200000 100000")
    assert cgroup_cpu_quota("0::/host/slice/container", tmp_path) == (2.0, f"{tmp_path / 'cpu.max'} = 200000 100000")


def test_quota_above_the_mask_keeps_the_mask(tmp_path: Path) -> None:
    write(tmp_path / "cpu.max", "800000 100000")
    budget = thread_budget(None, cpus={0, 1}, proc_cgroup="0::/", root=tmp_path)
    assert budget.threads == 2 and "cgroup quota 8 CPUs" in budget.reason


def test_setting_overrides_and_fixes(tmp_path: Path) -> None:
    write(tmp_path / "cpu.max", "100000 100000")
    budget = thread_budget(3, cpus={0, 1}, proc_cgroup="0::/", root=tmp_path)
    assert (budget.threads, budget.fixed) == (3, True)
    assert "LORASWAP_THREADS=3" in budget.reason


def test_probe_reads_this_process() -> None:
    probe = SchedProbe()
    first = probe.sample()
    if first is None:
        pytest.skip("no /proc schedstat on this system")
    sum(i * i for i in range(200_000))
    second = probe.sample()
    assert second is not None
    assert second.wall > first.wall and second.run_delay >= first.run_delay and second.idle >= first.idle


class Clock:
    """Samples at a steady step rate, with given waiting and idle rates per second."""

    def __init__(self) -> None:
        self.now = Sample(0.0, 0.0, 0.0)

    def step(self, seconds: float, waiting: float, idle: float) -> Sample:
        n = self.now
        self.now = Sample(n.wall + seconds, n.run_delay + waiting * seconds, n.idle + idle * seconds)
        return self.now


def run(gov: ThreadGovernor, clock: Clock, seconds: float, waiting: float, idle: float) -> list[int]:
    changes = []
    end = clock.now.wall + seconds
    while clock.now.wall < end:
        change = gov.observe(clock.step(0.1, waiting, idle))
        if change is not None:
            changes.append(change)
    return changes


def test_quiet_keeps_the_budget() -> None:
    gov, clock = ThreadGovernor(2), Clock()
    assert run(gov, clock, 30, waiting=0.02, idle=0.0) == []
    assert gov.threads == 2


def test_contention_drops_a_thread_within_a_window_and_stays_down() -> None:
    gov, clock = ThreadGovernor(2), Clock()
    run(gov, clock, 5, waiting=0.02, idle=0.0)
    assert run(gov, clock, 0.7, waiting=1.0, idle=0.0) == [1]
    # The neighbour holds its core: nothing idle, one thread keeps its own core.
    assert run(gov, clock, 30, waiting=0.05, idle=0.0) == []
    assert gov.threads == 1


def test_never_below_one_thread() -> None:
    gov, clock = ThreadGovernor(2), Clock()
    assert run(gov, clock, 20, waiting=2.0, idle=0.0) == [1]


def test_neighbour_gone_takes_the_thread_back_after_the_hold() -> None:
    gov, clock = ThreadGovernor(2, hold=2.0), Clock()
    run(gov, clock, 1, waiting=1.0, idle=0.0)
    assert gov.threads == 1
    changes = run(gov, clock, 1.0, waiting=0.0, idle=0.97)
    assert changes == []  # inside the hold
    assert run(gov, clock, 2.0, waiting=0.0, idle=0.97) == [2]


def test_a_greedy_neighbour_backs_the_retries_off() -> None:
    """A neighbour that takes whatever is idle: each retry fails at once, and the retries grow apart."""
    gov, clock = ThreadGovernor(2, hold=2.0, max_hold=16.0), Clock()
    run(gov, clock, 1, waiting=1.0, idle=0.0)
    raises = []
    for _ in range(8):
        # One thread: the neighbour leaves a CPU idle each time, until the governor raises.
        while gov.threads == 1:
            if gov.observe(clock.step(0.1, 0.0, 0.9)) == 2:
                raises.append(clock.now.wall)
        run(gov, clock, 0.7, waiting=1.0, idle=0.0)  # and takes it back at once
        assert gov.threads == 1
    gaps = [b - a for a, b in itertools.pairwise(raises)]
    assert gaps[-1] > 3 * gaps[0]
    assert max(gaps) <= 16.0 + 2.0


def test_a_raise_that_stays_resets_the_hold() -> None:
    gov, clock = ThreadGovernor(2, hold=2.0, max_hold=16.0), Clock()
    for _ in range(3):  # three failed retries: the hold grows
        run(gov, clock, 0.7, waiting=1.0, idle=0.0)
        while gov.threads == 1:
            gov.observe(clock.step(0.1, 0.0, 0.9))
    run(gov, clock, 0.7, waiting=1.0, idle=0.0)
    assert gov.hold > 2.0
    while gov.threads == 1:
        gov.observe(clock.step(0.1, 0.0, 0.9))
    run(gov, clock, 3, waiting=0.01, idle=0.0)  # the neighbour has gone for good
    assert gov.threads == 2 and gov.hold == 2.0


def test_reset_forgets_the_window() -> None:
    gov, clock = ThreadGovernor(2), Clock()
    gov.observe(clock.step(0.1, 0.0, 0.0))
    clock.step(10.0, 1.0, 0.0)  # idle engine: a long gap that must not count
    gov.reset()
    assert gov.observe(clock.step(0.1, 0.0, 0.0)) is None
    assert gov.observe(clock.step(0.6, 0.0, 0.0)) is None
    assert gov.threads == 2


class FakeProbe(SchedProbe):
    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def sample(self) -> Sample | None:
        return self.samples.pop(0)


def test_cpu_threads_fixed_by_the_setting_never_adapts() -> None:
    applied: list[int] = []
    said: list[str] = []
    threads = CpuThreads(3, applied.append, report=said.append, probe=FakeProbe([]))
    for _ in range(10):
        threads.after_step(busy=True)  # the fake probe would fail if it were read
    assert applied == [3] and threads.threads == 3
    assert said and "LORASWAP_THREADS=3" in said[0] and "fixed" in said[0]


def test_cpu_threads_applies_the_governors_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("loraswap.server.worker.threads.cgroup_cpu_quota", lambda *a: None)
    clock = Clock()
    samples = [clock.step(0.3, 1.0, 0.0) for _ in range(4)]  # waiting a whole CPU-second per second
    applied: list[int] = []
    said: list[str] = []
    threads = CpuThreads(None, applied.append, report=said.append, probe=FakeProbe(samples))
    threads.after_step(busy=False)  # idle engine: the probe is not read
    for _ in range(4):
        threads.after_step(busy=True)
    assert applied == [2, 1] and threads.threads == 1
    assert "2 CPUs in the affinity mask" in said[0] and "waiting for a CPU" in said[-1]

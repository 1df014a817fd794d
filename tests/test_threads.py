"""The worker's compute threads: the budget from the affinity mask and cgroup quotas (fake cgroup trees), and the
governor's decisions from the scheduler's accounts (synthetic samples)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest

from loraswap.server.worker.cpu_budget import cgroup_cpu_quota, thread_budget
from loraswap.server.worker.threads import CpuThreads, Sample, SchedProbe, ThreadGovernor


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


class World:
    """A 2-core machine as the worker sees it, per thread count: rows decoded per second, seconds its threads wait
    for a CPU per second, idle CPUs. A model of the two cases the governor must tell apart: quiet, two threads do
    more work than one while the server's own API process makes them wait; beside a busy process, two threads
    do a fraction of one thread's work."""

    QUIET: ClassVar[dict[int, tuple[float, float, float]]] = {2: (210.0, 0.5, 0.0), 1: (150.0, 0.05, 0.9)}
    NEIGHBOUR: ClassVar[dict[int, tuple[float, float, float]]] = {2: (15.0, 1.0, 0.0), 1: (130.0, 0.1, 0.0)}
    # A neighbour that takes whatever is idle: it leaves a CPU idle while the worker runs one thread, and takes it
    # back (and the worker's second thread with it) as soon as the worker runs two.
    GREEDY: ClassVar[dict[int, tuple[float, float, float]]] = {2: (15.0, 1.0, 0.0), 1: (130.0, 0.1, 0.9)}

    def __init__(self, gov: ThreadGovernor) -> None:
        self.gov = gov
        self.now = Sample(0.0, 0.0, 0.0, 0.0)
        self.counts: list[int] = []
        """The thread count of every step."""

    def run(self, seconds: float, machine: dict[int, tuple[float, float, float]], dt: float = 0.1) -> list[int]:
        changes = []
        end = self.now.wall + seconds
        while self.now.wall < end - 1e-9:
            rate, waiting, idle = machine[self.gov.threads]
            self.counts.append(self.gov.threads)
            n = self.now
            self.now = Sample(n.wall + dt, n.run_delay + waiting * dt, n.idle + idle * dt, n.work + rate * dt)
            change = self.gov.observe(self.now)
            if change is not None:
                changes.append(change)
        return changes


def test_quiet_keeps_the_budget() -> None:
    gov = ThreadGovernor(2)
    world = World(gov)
    world.run(60, {2: (210.0, 0.02, 0.0), 1: (150.0, 0.0, 0.9)})
    assert gov.threads == 2 and set(world.counts) == {2}  # nothing suggested a trial


def test_a_quiet_server_whose_threads_wait_tries_one_thread_rarely_and_goes_back() -> None:
    gov = ThreadGovernor(2, hold=2.0, max_hold=30.0)
    world = World(gov)
    world.run(120, World.QUIET)
    assert gov.threads == 2
    one = world.counts.count(1) / len(world.counts)
    assert 0 < one < 0.1  # a few trials (two windows each) in two minutes, each undone
    trials = world.run(60, World.QUIET)
    assert len(trials) <= 2 * 3  # at most one trial (and its undoing) per 30 s once backed off


def test_a_neighbour_is_answered_within_two_windows_even_after_backing_off() -> None:
    gov = ThreadGovernor(2, window=0.5, hold=2.0, max_hold=30.0)
    world = World(gov)
    world.run(120, World.QUIET)  # failed trials: the next one waits up to 30 s
    assert gov.hold[-1] == 30.0
    while world.counts[-1] != 2 or gov.trial is not None:
        world.run(0.1, World.QUIET)
    world.run(0.6, World.QUIET)
    changes = world.run(1.2, World.NEIGHBOUR)
    assert changes == [1]  # the collapse started a trial at once, and one thread did more work: kept
    assert world.run(30, World.NEIGHBOUR) == []  # no CPU idle: one thread keeps its core
    assert gov.threads == 1


def test_a_trial_that_clearly_fails_or_succeeds_is_judged_within_half_a_window() -> None:
    gov = ThreadGovernor(2, window=0.5, hold=2.0)
    world = World(gov)
    world.run(5, World.NEIGHBOUR)  # settled on one thread beside the busy process
    assert gov.threads == 1 and gov.trial is None
    gov.next_try[1] = 0.0
    world.run(0.5, World.GREEDY)  # a CPU looks idle: two threads are tried, and each step is several times slower
    assert gov.trial is None and gov.threads == 1
    assert world.counts[-8:].count(2) <= 3  # undone after a quarter to half a window, not two windows
    gov2 = ThreadGovernor(2, window=0.5, hold=2.0)
    world2 = World(gov2)
    world2.run(2, World.QUIET)
    before = len(world2.counts)
    world2.run(1.0, World.NEIGHBOUR)  # the neighbour arrives: one window notices, half a window confirms
    assert gov2.threads == 1 and gov2.trial is None
    assert world2.counts[before:].count(2) <= 6


def test_never_below_one_thread() -> None:
    gov = ThreadGovernor(2)
    world = World(gov)
    world.run(20, {2: (15.0, 2.0, 0.0), 1: (100.0, 2.0, 0.0)})
    assert gov.threads == 1 and min(world.counts) == 1


def test_the_neighbour_gone_brings_the_thread_back() -> None:
    gov = ThreadGovernor(2, hold=2.0)
    world = World(gov)
    world.run(5, World.NEIGHBOUR)
    assert gov.threads == 1
    assert world.run(1.5, World.QUIET)[0] == 2  # a CPU idle: tried, and two threads did more work
    start = len(world.counts)
    world.run(40, World.QUIET)  # its waiting threads suggest fewer now and then: tried, undone, backed off
    assert gov.threads == 2 or gov.trial is not None
    assert world.counts[start:].count(2) / len(world.counts[start:]) > 0.8


def test_a_greedy_neighbour_backs_the_retries_off() -> None:
    gov = ThreadGovernor(2, hold=2.0, max_hold=16.0)
    world = World(gov)
    world.run(200, World.GREEDY)
    assert gov.threads == 1 or gov.trial is not None
    two = world.counts.count(2) / len(world.counts)
    assert two < 0.1  # each retry costs two windows, and the retries grow apart
    assert gov.hold[1] == 16.0


def test_reset_forgets_the_window() -> None:
    gov = ThreadGovernor(2)
    gov.observe(Sample(0.0, 0.0, 0.0, 0.0))
    gov.reset()  # idle engine: a long gap with waiting that must not count
    assert gov.observe(Sample(10.0, 10.0, 0.0, 0.0)) is None
    assert gov.observe(Sample(10.6, 10.0, 0.0, 100.0)) is None
    assert gov.threads == 2


class FakeProbe(SchedProbe):
    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def sample(self, run_delay: bool = True) -> Sample | None:
        return self.samples.pop(0)


def test_cpu_threads_fixed_by_the_setting_never_adapts() -> None:
    applied: list[int] = []
    said: list[str] = []
    threads = CpuThreads(3, applied.append, report=said.append, probe=FakeProbe([]))
    for _ in range(10):
        threads.after_step(16, busy=True)  # the fake probe would fail if it were read
    assert applied == [3] and threads.threads == 3
    assert said and "LORASWAP_THREADS=3" in said[0] and "fixed" in said[0]


def test_cpu_threads_applies_and_reports_what_the_governor_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("loraswap.server.worker.cpu_budget.cgroup_cpu_quota", lambda *a: None)
    # Every step takes 0.3 s and the threads wait a whole CPU-second per second: beside a busy process.
    samples = [Sample(0.3 * i, 1.0 * 0.3 * i, 0.0) for i in range(1, 8)]
    applied: list[int] = []
    said: list[str] = []
    ticks = iter(0.3 * i for i in range(100))  # the worker's clock, as the samples' walls
    threads = CpuThreads(
        None, applied.append, report=said.append, probe=FakeProbe(samples), clock=lambda: next(ticks), idle_tick=None
    )
    threads.after_step(0, busy=False)  # idle engine: the probe is not read
    for _ in range(7):
        # Two threads decode a row per step, one thread ten (the neighbour's core is left to it).
        threads.after_step(1 if threads.threads == 2 else 10, busy=True)
    assert applied == [2, 1] and threads.threads == 1
    assert "2 CPUs in the affinity mask" in said[0]
    assert said[1:] == ["compute threads: 1 of 2 (other processes held the CPUs: the steps did more work)"]


def test_cpu_threads_reads_the_accounts_a_few_times_a_window_not_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("loraswap.server.worker.cpu_budget.cgroup_cpu_quota", lambda *a: None)
    probe = FakeProbe([Sample(0.0, 0.0, 0.0)])  # a second read would fail: the list is empty
    threads = CpuThreads(None, lambda n: None, report=lambda m: None, probe=probe, clock=lambda: 5.0)
    for _ in range(50):  # fifty steps within one instant of the worker's clock
        threads.after_step(16, busy=True)
    assert probe.samples == [] and threads.work == 50 * 16


def test_the_probe_counts_niced_processes_time_as_free(tmp_path: Path) -> None:
    # /proc/stat columns: user nice system idle iowait ...; a niced process yields to the worker's threads
    write(tmp_path / "stat", "cpu  900 900 90 900 9\ncpu0 500 300 50 200 0\ncpu1 400 600 40 700 9")
    write(tmp_path / "self" / "task" / "7" / "schedstat", "100 2500000000 10")
    sample = SchedProbe(cpus={0}, proc=tmp_path).sample()
    assert sample is not None
    assert sample.run_delay == 2.5
    assert sample.idle == pytest.approx((300 + 200 + 0) / SchedProbe(cpus={0}, proc=tmp_path).tick)
    cpus_only = SchedProbe(cpus={0}, proc=tmp_path).sample(run_delay=False)  # the idle watcher's reading
    assert cpus_only is not None and cpus_only.run_delay == 0 and cpus_only.idle == sample.idle


def idle_spell(free: list[float], tick: float = 0.1, start: float = 100.0) -> list[Sample]:
    """The watcher's readings over an idle spell whose ticks left `free` CPUs free each, then the reading before
    the next step."""
    samples, idle = [Sample(start, 0.0, 0.0)], 0.0
    for i, f in enumerate(free, 1):
        idle += f * tick
        samples.append(Sample(start + i * tick, 0.0, idle))
    return samples


def watched(samples: list[Sample], monkeypatch: pytest.MonkeyPatch) -> tuple[CpuThreads, list[int], list[str]]:
    """A 2-CPU worker that has just gone idle, its watcher having read every sample but the last (read by the
    step that ends the spell)."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("loraswap.server.worker.cpu_budget.cgroup_cpu_quota", lambda *a: None)
    applied: list[int] = []
    said: list[str] = []
    probe = FakeProbe(samples)
    threads = CpuThreads(None, applied.append, report=said.append, probe=probe, idle_tick=None)
    threads.engine_idle()
    while len(probe.samples) > 1:
        threads.sample_idle()
    return threads, applied, said


def test_an_idle_spell_beside_a_busy_process_starts_the_next_steps_with_one_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads, applied, said = watched(idle_spell([1.0, 0.9, 1.1, 1.0]), monkeypatch)
    threads.before_step()
    assert applied == [2, 1] and threads.threads == 1
    assert said[-1] == "compute threads: 1 of 2 (other processes held the CPUs while the engine was idle)"
    threads.before_step()  # not idle any more: nothing read, nothing changed
    assert applied == [2, 1]


def test_a_burst_in_the_idle_spell_is_not_a_neighbour(monkeypatch: pytest.MonkeyPatch) -> None:
    # the ticks before the step: a client busy on a core for two of them, then both CPUs free
    threads, applied, _ = watched(idle_spell([1.0, 1.0, 2.0]), monkeypatch)
    threads.before_step()
    assert applied == [2] and threads.threads == 2


def test_only_the_last_ticks_of_a_long_spell_count(monkeypatch: pytest.MonkeyPatch) -> None:
    # a long quiet spell, then a process that started spinning: the watcher keeps the lookback's ticks only
    threads, applied, _ = watched(idle_spell([2.0] * 20 + [1.0] * 4), monkeypatch)
    threads.before_step()
    assert applied == [2, 1]


def test_a_spell_too_short_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    threads, applied, _ = watched(idle_spell([1.0]), monkeypatch)
    threads.before_step()
    assert applied == [2] and threads.threads == 2


def test_a_quiet_idle_spell_brings_the_threads_back(monkeypatch: pytest.MonkeyPatch) -> None:
    threads, applied, said = watched(idle_spell([1.0, 1.0, 1.0]), monkeypatch)
    threads.before_step()  # the first spell: a neighbour
    threads.probe.samples = idle_spell([2.0] * 4, start=200.0)  # type: ignore[attr-defined]
    threads.after_step(0, busy=False)  # the second spell: the neighbour has gone
    while len(threads.probe.samples) > 1:  # type: ignore[attr-defined]
        threads.sample_idle()
    threads.before_step()
    assert applied == [2, 1, 2]
    assert said[-1] == "compute threads: 2 of 2 (the CPUs are free again while the engine was idle)"


def test_after_a_resume_below_the_budget_one_more_thread_is_tried_whatever_the_idle_time() -> None:
    # a burst (not a neighbour) made the idle spell look busy; the steps then leave no CPU idle (the server's
    # API process and its clients take it), so only the check finds the second thread again
    busy_quiet: dict[int, tuple[float, float, float]] = {2: (210.0, 0.2, 0.0), 1: (150.0, 0.05, 0.0)}
    gov = ThreadGovernor(2)
    world = World(gov)
    assert gov.resume(1.0) == 1
    changes = world.run(3, busy_quiet)
    assert changes == [2] and gov.threads == 2  # tried after the first window, and kept
    # beside a process that stays, the check fails once and the count from the spell stays
    gov2 = ThreadGovernor(2)
    world2 = World(gov2)
    assert gov2.resume(1.0) == 1
    assert world2.run(10, World.NEIGHBOUR) == [2, 1]
    assert gov2.threads == 1 and world2.counts.count(2) <= 3  # the failed check: at most half a window


def test_the_watcher_stops_where_the_accounts_cannot_be_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("loraswap.server.worker.cpu_budget.cgroup_cpu_quota", lambda *a: None)
    probe = FakeProbe([None])  # type: ignore[list-item]  # what SchedProbe gives without /proc
    threads = CpuThreads(None, lambda n: None, report=lambda m: None, probe=probe, idle_tick=0.01)
    threads.engine_idle()
    assert threads.watcher is not None
    threads.watcher.join(timeout=5)
    assert not threads.watcher.is_alive() and probe.samples == []
    threads.before_step()  # nothing read, nothing changed
    assert threads.threads == 2

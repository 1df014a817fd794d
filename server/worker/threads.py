"""How many compute threads a CPU worker runs: what it may use, and what it gets while others share the CPUs.

Every decoding step runs hundreds of small OpenMP parallel regions (torch's ops and loraswap's 4-bit kernels), and
each region ends at a barrier where the team's threads spin until the last one arrives. When another process takes
one of the cores, the thread it displaced reaches each barrier a scheduler slice late while its teammates spin:
with one busy neighbour on a 2-core machine, a 16-row decoding step of the embedded base went from 64.5 ms to
566 ms (`python -m loraswap.bench.steps --batch 16 --adapters 1 --tokens 32`), and 83% of the engine's samples in
`perf` were libgomp's spin loop. So a worker runs as
many threads as it may use (`thread_budget`: the affinity mask and the cgroup CPU quota) and, while it steps, tries
one thread fewer when its threads keep waiting for a CPU and one more when a CPU it may use stays idle, keeping a
count only where the steps did more work with it (`ThreadGovernor`). The scheduler's own accounts suggest the
trials: the run-queue wait of the process's threads (`/proc/self/task/*/schedstat`) and the idle time of the CPUs
in its mask (`/proc/stat`). A step cannot be changed once started, and one step with a thread too many costs
many quiet ones (a 16-prompt prefill beside a busy process: 14.4 s with two threads, 0.74 s alone), so while the
engine is idle a watcher reads how many CPUs other processes leave free, and the first step after the idle spell
starts from that (`CpuThreads.before_step`).

No torch here: the worker applies the counts (`torch.set_num_threads` on its engine thread); CUDA workers keep
torch's defaults.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraswap.server.worker.cpu_budget import read_text, thread_budget

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """The scheduler's accounts at one moment, in seconds."""

    wall: float
    run_delay: float
    """Time the process's threads have spent runnable but waiting for a CPU, summed over its threads."""
    idle: float
    """Time the CPUs in the affinity mask were free for the worker, summed over them: idle, or running niced
    processes (positive nice), which a thread at the worker's priority displaces."""
    work: float = 0.0
    """Work the engine has done: rows decoded, summed over its steps."""


class SchedProbe:
    """Reads the accounts `ThreadGovernor` decides on, from /proc (Linux); `None` where they cannot be read."""

    def __init__(self, cpus: set[int] | None = None, proc: Path = Path("/proc")) -> None:
        self.cpus = {f"cpu{c}" for c in (os.sched_getaffinity(0) if cpus is None else cpus)}
        self.proc = proc
        self.tick = os.sysconf("SC_CLK_TCK")

    def sample(self, run_delay: bool = True) -> Sample | None:
        """The accounts now; with `run_delay` False the threads' wait is not read (0: a file per thread, which the
        idle watcher, reading only the CPUs' time, does not need ten times a second)."""
        delay = 0
        try:
            tasks = list((self.proc / "self" / "task").iterdir()) if run_delay else []
        except OSError:
            return None
        for task in tasks:
            text = read_text(task / "schedstat")  # a thread can end between the listing and the read
            if text:
                delay += int(text.split()[1])
        stat = read_text(self.proc / "stat")
        if stat is None:
            return None
        idle = 0
        for line in stat.splitlines():
            fields = line.split()
            if fields and fields[0] in self.cpus:
                # idle + iowait, and the time of niced processes (`nice` column), which yield to the worker's threads
                idle += int(fields[2]) + int(fields[4]) + int(fields[5])
        return Sample(time.monotonic(), delay / 1e9, idle / self.tick)


class ThreadGovernor:
    """Decides, between engine steps, how many of `budget` threads the next steps run: it tries a count when the
    scheduler's accounts suggest it, and keeps it only if the steps did more work with it.

    Over each window of at least `window` seconds it measures the work done (rows decoded per second), the time
    the process's threads waited for a CPU and the mask's idle CPU time. With more than one thread, waiting above
    `contended` seconds per second suggests one thread fewer; below the budget, at least `spare` idle CPUs
    suggest one more. A suggestion starts a trial: the next two windows run the new count (half a window where
    its work per second is `clear` times above or below the count before), and it is kept if they did at least
    `gain` times the work per second of the window before, else the old count comes back and that direction
    waits twice as long as before (from `hold` up to `max_hold` seconds) before its next trial. A kept trial of
    one more thread resets that direction's wait; one of fewer threads does not, since a quiet server's waiting
    threads keep suggesting fewer. Where the work of a window collapses below `collapse` of the recent best while
    the threads wait, the trial starts at once, whatever the wait: a neighbour that arrives is answered within a
    window and a half.

    The waiting alone cannot decide: a server's own API process and its clients make the worker's threads wait
    too, and there two threads still do more work than one (2 cores, 16 streaming clients); beside a busy process
    two threads did a fraction of one thread's work."""

    def __init__(
        self,
        budget: int,
        window: float = 0.5,
        contended: float = 0.25,
        spare: float = 0.6,
        gain: float = 1.05,
        collapse: float = 0.5,
        clear: float = 2.0,
        hold: float = 2.0,
        max_hold: float = 30.0,
    ) -> None:
        self.budget = budget
        self.threads = budget
        self.window, self.contended, self.spare, self.gain, self.collapse = window, contended, spare, gain, collapse
        self.clear = clear
        self.base_hold, self.max_hold = hold, max_hold
        self.hold = {-1: hold, 1: hold}  # per direction: fewer (-1) and more (+1) threads
        self.next_try = {-1: 0.0, 1: 0.0}
        self.start: Sample | None = None
        self.trial: tuple[int, float] | None = None
        """While a count is on trial: the count before it and the work per second it did."""
        self.best = 0.0
        """The most work per second of recent windows at the current count (decaying)."""
        self.unchecked = False
        """The count came from an idle spell (`resume`) below the budget and no step has shown it better yet."""

    def reset(self) -> None:
        """Forget the window: the engine was idle, and idle time says nothing about the steps."""
        self.start = None

    def resume(self, free: float) -> int | None:
        """The engine has work again after an idle spell during which the mask's CPUs were `free` CPUs free (see
        `Sample.idle`): run as many threads as were free, rounded, within the budget; returns the new count when it
        changes. A step can take many times its quiet time with a thread too many (a 16-prompt prefill beside a
        busy process: 14.4 s with two threads against 0.74 s alone), so the first step after an idle spell must
        not be the one that finds out: the idle spell already showed what other processes take. But the spell
        cannot tell a process that stays from a burst of work (a client loading a model just before it sends),
        so a count below the budget is checked: after its first window, one more thread is tried whatever the
        idle time (a trial beside a process that stays costs a step or two)."""
        self.start = None
        self.trial = None
        threads = max(1, min(self.budget, math.floor(free + 0.5)))
        self.unchecked = threads < self.budget
        if threads == self.threads:
            return None
        self.threads = threads
        return threads

    def observe(self, now: Sample) -> int | None:
        """Feed the accounts after a step; returns the new thread count when it changes."""
        if self.start is None:
            self.start = now
            return None
        span = now.wall - self.start.wall
        rate = (now.work - self.start.work) / span if span > 0 else 0.0
        if self.trial is not None:
            if not self._decided(span, rate):
                return None
            before, baseline = self.trial
            self.trial = None
            self.start = now
            return self._judge(before, baseline, rate, now.wall)
        if span < self.window:
            return None
        waiting = (now.run_delay - self.start.run_delay) / span
        idle = (now.idle - self.start.idle) / span
        self.start = now
        collapsed = rate < self.collapse * self.best
        self.best = max(rate, 0.8 * self.best)
        if self.threads > 1 and waiting > self.contended and (now.wall >= self.next_try[-1] or collapsed):
            return self._try(self.threads - 1, rate)
        if self.threads < self.budget and (idle >= self.spare or self.unchecked) and now.wall >= self.next_try[1]:
            self.unchecked = False
            return self._try(self.threads + 1, rate)
        return None

    def _decided(self, span: float, rate: float) -> bool:
        """Whether the count on trial has run long enough to judge: two windows, or half of one where its work
        per second is `clear` times above or below the count before (a second thread beside a busy process
        makes each step several times slower: no need to lose two windows to confirm it)."""
        assert self.trial is not None
        baseline = self.trial[1]
        if span >= 2 * self.window:
            return True
        return span >= self.window / 2 and (rate * self.clear <= baseline or rate >= self.clear * baseline)

    def _try(self, threads: int, rate: float) -> int:
        self.trial = (self.threads, rate)
        self.threads = threads
        return threads

    def _judge(self, before: int, baseline: float, rate: float, when: float) -> int | None:
        """Keep the count on trial if it did more work than `before` did (`baseline`), else go back."""
        direction = 1 if self.threads > before else -1
        if rate >= self.gain * baseline:
            if direction == 1:  # a CPU came back: the next time one is idle, try it at once
                self.hold[1] = self.base_hold
            self.best = rate
            return None
        self.next_try[direction] = when + self.hold[direction]
        self.hold[direction] = min(self.max_hold, 2 * self.hold[direction])
        self.threads = before
        self.best = max(self.best, baseline)  # the best before the trial: a collapse still starts the next one
        return before


class CpuThreads:
    """The worker's compute threads over its life: the budget at start-up, then the governor between steps.

    `apply` sets the thread count (`torch.set_num_threads`, called on the engine thread, whose OpenMP teams the
    steps use); `report` says each choice (the worker prints it). The budget is read again every `recheck`
    seconds, so a quota changed at run time (a container's CPUs resized) is followed. A budget set by
    LORASWAP_THREADS is kept as it is."""

    def __init__(
        self,
        setting: int | None,
        apply: Callable[[int], None],
        report: Callable[[str], None] = log.info,
        recheck: float = 1.0,
        probe: SchedProbe | None = None,
        clock: Callable[[], float] = time.monotonic,
        idle_tick: float | None = 0.1,
        lookback: float = 0.3,
    ) -> None:
        self.setting, self.apply, self.report, self.recheck = setting, apply, report, recheck
        self.budget = thread_budget(setting)
        self.governor = ThreadGovernor(self.budget.threads)
        self.probe = probe or SchedProbe()
        self.work = 0.0
        self.clock = clock
        self.next_sample = 0.0
        """Reading the accounts takes about 0.2 ms (a file per thread): done a few times a window, not every step."""
        self.settled = self.budget.threads
        """The count last reported: trials are not reported, the counts kept are."""
        self.checked = time.monotonic()
        self.idle_tick = idle_tick
        """Seconds between the watcher thread's readings (None: no thread; `sample_idle` is then called from
        outside, as the tests do, at the same pace)."""
        self.idle_period = idle_tick or 0.1
        self.idle_samples: deque[Sample] = deque(maxlen=round(lookback / self.idle_period) + 1)
        """The accounts over the last `lookback` seconds of the engine's idle spell."""
        self.idle = threading.Event()
        """Set while the engine is idle."""
        self.watcher: threading.Thread | None = None
        apply(self.budget.threads)
        adapting = "fixed" if self.budget.fixed else "fewer while other processes hold the CPUs"
        report(f"compute threads: {self.budget.threads} ({self.budget.reason}; {adapting})")

    @property
    def threads(self) -> int:
        return self.governor.threads

    def after_step(self, rows: int, busy: bool) -> None:
        """Called after each engine step: `rows` it decoded; `busy`: requests are still running or waiting."""
        if self.budget.fixed:
            return
        if not busy:
            self.governor.reset()
            self.next_sample = 0.0
            self.engine_idle()
            return
        self.work += rows
        now = self.clock()
        if now < self.next_sample:
            return
        self.next_sample = now + self.governor.window / 4
        sample = self.probe.sample()
        if sample is None:
            return
        if sample.wall - self.checked >= self.recheck:
            self.checked = sample.wall
            self._recheck_budget()
        change = self.governor.observe(dataclasses.replace(sample, work=self.work))
        if change is not None:
            self.apply(change)
        if self.governor.trial is None and self.governor.threads != self.settled:
            self.settled = self.governor.threads
            why = "other processes held the CPUs" if self.settled < self.budget.threads else "a CPU is free again"
            self.report(f"compute threads: {self.settled} of {self.budget.threads} ({why}: the steps did more work)")

    def engine_idle(self) -> None:
        """The engine has no work: from now until `before_step`, the watcher reads what other processes take."""
        if self.budget.fixed or self.idle.is_set():
            return
        self.idle_samples.clear()
        self.idle.set()
        if self.idle_tick and self.watcher is None:
            self.watcher = threading.Thread(target=self._watch, name="loraswap-cpu-watch", daemon=True)
            self.watcher.start()

    def _watch(self) -> None:
        assert self.idle_tick
        while True:
            self.idle.wait()
            if not self.sample_idle():
                return  # no /proc here (not Linux): nothing to watch
            time.sleep(self.idle_tick)

    def sample_idle(self) -> bool:
        """One reading of the accounts during the engine's idle spell; False where they cannot be read."""
        sample = self.probe.sample(run_delay=False)
        if sample is not None and self.idle.is_set():
            self.idle_samples.append(sample)
        return sample is not None

    def before_step(self) -> None:
        """Called before each engine step. The first step after an idle spell runs as many threads as the spell's
        last `lookback` seconds left CPUs free (the engine's threads were asleep, so whatever ran was another
        process): a busy neighbour that arrived while the server was idle costs no step run with a thread too
        many. The most free CPUs of any tick count, not the mean: a process that keeps a CPU leaves none of the
        ticks free, a burst of work (a client starting, the server's own API process) leaves some. A spell
        shorter than two ticks says too little and changes nothing. The costs are uneven, hence the short
        lookback: one thread too few costs a seventh of the work until the governor's next trial, one too many
        beside a busy process twenty times the step."""
        if not self.idle.is_set():
            return
        self.idle.clear()
        samples = list(self.idle_samples)
        now = self.probe.sample(run_delay=False) if samples else None
        if now is None or now.wall - samples[0].wall < 2 * self.idle_period:
            return
        # A tick much shorter than the watcher's says nothing: /proc/stat counts in 10 ms jiffies.
        ticks = [
            (a, b) for a, b in zip(samples, [*samples[1:], now], strict=True) if b.wall - a.wall >= self.idle_period / 2
        ]
        free = max(((b.idle - a.idle) / (b.wall - a.wall) for a, b in ticks), default=None)
        change = None if free is None else self.governor.resume(free)
        if change is None:
            return
        self.apply(change)
        self.settled = change
        why = "other processes held the CPUs" if change < self.budget.threads else "the CPUs are free again"
        self.report(f"compute threads: {change} of {self.budget.threads} ({why} while the engine was idle)")

    def _recheck_budget(self) -> None:
        budget = thread_budget(self.setting)
        if budget.threads == self.budget.threads:
            return
        self.budget = budget
        self.governor = ThreadGovernor(budget.threads)
        self.settled = budget.threads
        self.apply(budget.threads)
        self.report(f"compute threads: {budget.threads} (the budget changed: {budget.reason})")

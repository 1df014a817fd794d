"""The queue bridge: a `Job` onto LitServe's request queue, its `JobEvent`s back, and the watch over the workers.

LitServe gives the API process a request queue (shared by the workers) and a response buffer (one entry per
request in flight, filled from the workers' responses). A job goes on the queue under its uid; whichever worker
takes it streams one event per engine step back. If the client goes away first, the workers are told through
the shared `cancels` dict; if the worker running a job dies, the watch ends the job with a "worker_lost" event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from loraswap.server.api.errors import APIError
from loraswap.server.api.metrics import Metrics
from loraswap.server.jobs import Job, JobEvent, failed

WATCH_SECONDS = 0.5
"""How often the API process checks that the workers running its requests are alive."""

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a killed worker stays a zombie until LitServe reaps it)."""
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


class Bridge:
    """Runs jobs on the workers for the routes of one API process.

    `spec` is the LitSpec LitServe connected to its queues (`LitSpec.setup`); `cancels` (uid -> time) and
    `workers` (LitServe's worker index -> process id) are dicts shared with the workers through a
    multiprocessing manager (None: no cancels, no watch)."""

    def __init__(self, spec: LitSpec, metrics: Metrics, cancels: Any = None, workers: Any = None) -> None:
        self.spec = spec
        self.metrics = metrics
        self.cancels = cancels
        self.workers = workers
        self._loaded: dict[int, set[str]] = {}  # worker pid -> adapter names it reported loaded
        self._watchdog: asyncio.Task[None] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_watchdog": None}

    def loaded(self) -> set[str]:
        """The adapters some worker reported loaded (on the last event of one of its jobs)."""
        return set().union(*self._loaded.values())

    async def events(self, job: Job, route: str) -> AsyncIterator[JobEvent]:
        """Queue `job` for a worker and yield its events until it finishes. If the consumer stops early
        (the client disconnected), the worker is told to drop the job."""
        spec, m = self.spec, self.metrics
        adapter = "mixture" if job.mixture else job.adapter or "base"  # the metrics' label
        start = time.perf_counter()
        first = True
        q: deque[Any] = deque()
        event = asyncio.Event()
        spec.response_buffer[job.uid] = ResponseBufferItem(event=event, response_queue=q)
        self._watch_workers()
        spec.request_queue.put((spec.response_queue_id, job.uid, time.monotonic(), job))
        m.inflight.queued(job.adapter)
        started = False
        finished = False
        try:
            async for data, status in spec.data_streamer(q, event, send_status=True):
                if status == LitAPIStatus.ERROR:
                    finished = True
                    raise APIError(500, "the inference worker failed on this request")
                ev = JobEvent.from_wire(json.loads(data) if isinstance(data, str) else data)
                if not started:
                    m.inflight.started(job.adapter)
                    started = True
                m.event(ev)
                if ev.loaded_names is not None:
                    self._loaded[ev.worker] = set(ev.loaded_names)
                if first and (ev.text or ev.finish_reason):
                    m.ttft.labels(route, adapter).observe(time.perf_counter() - start)
                    first = False
                if ev.finish_reason:
                    finished = True
                    m.latency.labels(route, adapter).observe(time.perf_counter() - start)
                    m.tokens.labels(adapter).inc(ev.completion_tokens)
                    m.prompt_tokens.inc(ev.prompt_tokens)
                    m.cached_tokens.inc(ev.cached_tokens)
                    if ev.error:
                        m.errors.labels(route, adapter).inc()
                yield ev
        finally:
            m.inflight.ended(job.adapter, started)
            spec.response_buffer.pop(job.uid, None)  # LitServe's own spec leaks this entry (litserve#452)
            if not finished:
                # Whichever worker runs it sees this at its next step (the queue cannot address a worker).
                if self.cancels is not None:
                    self.cancels[job.uid] = time.monotonic()
                m.cancelled.inc()

    def _watch_workers(self) -> None:
        """Start, once per API process, the task that ends jobs whose worker died."""
        if self._watchdog is None and self.workers is not None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Every WATCH_SECONDS: a job a worker has taken (LitServe records which, as the job starts) whose
        worker process is gone ends at once with a "worker_lost" event; LitServe restarts the worker, and jobs
        still queued wait for it. Without this they would wait for their lost worker forever."""
        buffer = self.spec.response_buffer
        seen: dict[str, int] = {}  # uid -> pid of the worker that took it
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            taken = [(uid, item) for uid, item in list(buffer.items()) if item.worker_id is not None]
            seen = {uid: pid for uid, pid in seen.items() if uid in buffer}
            if not taken:
                continue
            try:
                pids = dict(self.workers)  # one round trip to the manager
            except Exception as e:  # the manager is going away (shutdown): its proxies fail in several ways
                log.debug("the workers' pids could not be read (%s); skipping this check", e)
                continue
            for uid, item in taken:
                pid = seen.setdefault(uid, pids.get(item.worker_id, 0))
                if pid and not _alive(pid):
                    log.warning("worker %s (pid %s) died; failing its request %s", item.worker_id, pid, uid)
                    buffer.pop(uid, None)
                    message = "the inference worker running this request stopped; it is being restarted, retry"
                    if item.response_queue is not None:
                        item.response_queue.append((failed(uid, message, "worker_lost").to_wire(), LitAPIStatus.OK))
                    item.event.set()

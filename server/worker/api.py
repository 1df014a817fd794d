"""The worker side: one base and one `Engine` per process, driven by LitServe's continuous-batching loop.

Each loop step is one engine step over every running request. Requests arrive as `jobs.Job`s already
validated by the API process (whose LitSpec, with its routes, this API is handed: the worker imports
nothing of the API side); each step's `jobs.JobEvent`s go back as plain data. The shared `cancels` dict
names requests whose client went away, and each worker records its process id in the shared `workers`
dict (by LitServe's worker index), so the API process can tell when the worker running a request has died.

No torch at import: the API process imports this module to build the server; the engine is imported in
the worker, in `setup`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import litserve as ls
from litserve.loops.continuous_batching_loop import ContinuousBatchingLoop, Output
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus

from loraswap.adapters.base import load_base
from loraswap.server.jobs import Job, JobEvent, failed
from loraswap.server.settings import Settings
from loraswap.server.worker.failures import failure_kind, forward_failed
from loraswap.server.worker.threads import CpuThreads

log = logging.getLogger(__name__)


class EngineLoop(ContinuousBatchingLoop):
    """LitServe's continuous-batching loop, without its busy wait when no request is running, and with every
    engine step on the worker's one engine thread (`LoraswapAPI.engine_thread`).

    LitServe runs each step with `asyncio.to_thread`, so consecutive steps land on whichever thread of the
    default pool is free. Each thread that calls into torch gets an OpenMP team of its own, and once libgomp
    manages more threads than there are cores it stops spin-waiting between parallel regions (its "throttled"
    spin count), so every one of a step's hundreds of small parallel regions wakes its team through the kernel:
    a 16-row decoding step of the embedded base took 63 ms on the first thread that ran torch and 87-93 ms on
    either thread once a second one had (2 cores). One thread owns the model, from loading it to every step.
    """

    async def run(self, lit_api: Any, *args: Any, **kwargs: Any) -> None:
        if not lit_api.has_active_requests():
            await asyncio.sleep(0.002)
            return
        await super().run(lit_api, *args, **kwargs)

    async def step(self, prev_outputs: Any, lit_api: Any, lit_spec: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(lit_api.engine_thread, lit_api.step, prev_outputs)


class LoraswapAPI(ls.LitAPI):
    def __init__(self, settings: Settings, spec: LitSpec, cancels: Any = None, workers: Any = None) -> None:
        """`spec`: the API process's LitSpec (its routes put Jobs on the request queue and read the events back);
        `cancels` and `workers`: the dicts shared with it (a multiprocessing manager's), or None."""
        super().__init__(max_batch_size=settings.max_batch_size, stream=True, spec=spec, loop=EngineLoop())
        self.settings = settings
        self.cancels = cancels
        self.workers = workers

    def setup(self, device: str) -> None:
        if self.workers is not None:  # LitServe sets the index before setup; a restarted worker keeps it
            self.workers[int(os.environ.get("LITSERVE_WORKER_ID", "0"))] = os.getpid()
        # Made here, in the worker process: the API object is pickled to it. The model is loaded on the thread
        # that will run every step (see EngineLoop).
        self.engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.engine_thread.submit(self._load, device).result()

    def _load(self, device: str) -> None:
        from loraswap.server.worker import fastpath
        from loraswap.server.worker.engine import Engine
        from loraswap.server.worker.seq2seq import Seq2SeqEngine

        s = self.settings
        self.threads: CpuThreads | None = None
        if device == "cpu":  # before the kernels are timed: they run with the threads the steps will have
            import torch

            self.threads = CpuThreads(s.threads, torch.set_num_threads, report=self._say)
        base = load_base(s.base, quant=s.quant, device=device, double_quant=s.double_quant)
        fast = fastpath.apply(base.model, s.lm_head, rows=s.max_batch_size, q4_kernel=s.q4_kernel)
        self._say(fastpath.describe(fast))
        store = self.settings.store()
        engine_class = Seq2SeqEngine if base.ref.kind == "seq2seq" else Engine
        self.engine = engine_class(
            base.model,
            base.tokenizer,
            store.get,
            max_batch_size=self.settings.max_batch_size,
            max_loaded=self.settings.max_loaded_adapters,
            max_loaded_bytes=self.settings.max_loaded_bytes,
            lora_impl=self.settings.lora_impl,
            max_prefill_tokens=self.settings.max_prefill_tokens,
            prefix_cache_bytes=self.settings.prefix_cache_bytes,
            short_first_steps=self.settings.short_first_steps,
            join_in_step=self.settings.join_in_step,
        )
        self.uids: dict[str, Any] = {}
        self.immediate: list[Output] = []
        if self.threads is not None:
            self.threads.engine_idle()  # loaded: from now until the first step, CPU time taken is other processes'

    @staticmethod
    def _say(message: str) -> None:
        print(f"loraswap: worker {os.getpid()}: {message}", file=sys.stderr, flush=True)

    def add_request(self, uid: Any, job: Job) -> None:
        """Queue `job`, taken from LitServe's request queue under `uid` (the API process makes both the same)."""
        if not isinstance(job, Job):
            message = f"a worker takes a loraswap.server.jobs.Job from the request queue, not {type(job).__name__}"
            self._finish(uid, failed(str(uid), message, "invalid_job"))
            return
        self.uids[job.uid] = uid
        try:
            self.engine.submit(job)
        except Exception as e:  # validated in the API process; a store change in between lands here
            del self.uids[job.uid]
            self._finish(uid, failed(job.uid, str(e), failure_kind(e), len(job.prompt_ids)))

    def _finish(self, uid: Any, event: JobEvent) -> None:
        self.immediate.append(Output(uid, event.to_wire(), LitAPIStatus.OK))
        self.immediate.append(Output(uid, "", LitAPIStatus.FINISH_STREAMING))

    def has_active_requests(self) -> bool:
        return bool(self.immediate) or self.engine.has_work()

    def has_capacity(self) -> bool:
        return True  # the engine queues what does not fit in its batch

    def _apply_cancels(self) -> None:
        """Cancel this worker's requests whose client went away; forget cancels older than a minute
        (their request ran on another worker, or had finished)."""
        if self.cancels is None or not self.cancels:
            return
        now = time.monotonic()
        for uid, when in list(self.cancels.items()):
            if uid in self.uids:
                self.engine.cancel(uid)
                self.cancels.pop(uid, None)
            elif now - when > 60:
                self.cancels.pop(uid, None)

    def step(self, prev_outputs: Any) -> list[Output]:
        self._apply_cancels()
        if self.threads is not None:
            self.threads.before_step()
        outputs, self.immediate = self.immediate, []
        rows = self.engine.running
        try:
            events = self.engine.step()
        except Exception as e:  # the engine contains per-request failures; this is the last guard
            log.exception("engine step failed")
            events = self.engine.fail_running(forward_failed(e))
        for event in events:
            uid = self.uids[event.uid]
            outputs.append(Output(uid, event.to_wire(), LitAPIStatus.OK))
            if event.finish_reason:
                outputs.append(Output(uid, "", LitAPIStatus.FINISH_STREAMING))
                del self.uids[event.uid]
        if self.threads is not None:
            self.threads.after_step(rows, busy=self.engine.has_work())
        return outputs

    def encode_response(self, output: Any, **kwargs: Any) -> Any:
        return output

    def predict(self, *args: Any, **kwargs: Any) -> Any:  # the loop calls step(); LitServe checks it exists
        raise NotImplementedError

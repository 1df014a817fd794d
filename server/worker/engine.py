"""A continuous-batching decode engine: one base, many LoRA adapters, chosen per request.

Every `step()` admits waiting requests (their prompts are prefilled together), runs one decoding
forward over all running requests, and retires the ones that finished, so a short answer never
waits for a long one. Requests whose prompts are mostly cached may instead join that decoding forward
(`joining.py`). Which adapter a request uses is request data, never model-global state
(`residency.py`): LoRA rows name their adapter slot or PEFT adapter, prompt and P-tuning rows get
their virtual tokens in front of the prompt's, prefix-tuning rows their keys and values in their part
of the cache; so one batch mixes every method and the base. The running rows and their batched,
left-padded KV cache are `batch.Batch`; positions are tracked per row, so padding never shifts a row's
rotary positions. Tokens are chosen and detokenised in `sampling.py`.

Short requests go first: a request whose `max_tokens` is at most a quarter of the largest running one's sits
in front of the batch, and while such rows run, up to `short_first_steps` decoding steps in a row run them alone
(the rows behind wait those steps out, with a masked column); then one step runs every row. On a CPU a step's
cost grows with its rows, so a short answer beside long ones would otherwise take each of its steps at the full
batch's pace. Requests of similar sizes all decode at every step.

The engine speaks `jobs.Job` and `jobs.JobEvent`; a failure is an event with an `ErrorKind`, never an exception
that leaves the engine (one job's failure fails that job, a failed forward the rows it ran).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from loraswap.adapters.prompt import generation_eos, stop_token_ids
from loraswap.adapters.store import StoreEntry
from loraswap.server.jobs import FinishReason, Job, JobEvent, failed
from loraswap.server.settings import PREFIX_CACHE_BYTES, LoraImpl
from loraswap.server.worker import joining, logprobs
from loraswap.server.worker.batch import Batch, Row, front_first
from loraswap.server.worker.failures import InvalidJob, failure_kind, forward_failed
from loraswap.server.worker.grammar import Grammars
from loraswap.server.worker.kvcache import new_cache, past_cache, plain_cache
from loraswap.server.worker.lru import CacheFull
from loraswap.server.worker.memory import return_freed_memory
from loraswap.server.worker.prefix import KV, PrefixCache
from loraswap.server.worker.residency import Residency
from loraswap.server.worker.sampling import generator_for, new_text, sample

log = logging.getLogger(__name__)

SHORT_RATIO = 4
"""A request is short, and goes first, when its max_tokens times this is at most the largest running one's."""


class Engine:
    batch_class: type[Batch] = Batch
    """The running batch's bookkeeping (an encoder-decoder engine keeps the encoder's output too: `seq2seq.py`)."""
    residency_class: type[Residency] = Residency
    """Where adapters are held (an encoder-decoder engine serves LoRA adapters only)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        resolve: Callable[[str], StoreEntry],
        max_batch_size: int = 8,
        max_loaded: int = 16,
        max_loaded_bytes: int = 1 << 30,
        max_context: int | None = None,
        lora_impl: LoraImpl = "batched",
        max_prefill_tokens: int = 1024,
        prefix_cache_bytes: int = PREFIX_CACHE_BYTES,
        prefix_block: int = 8,
        short_first_steps: int = 3,
        join_in_step: bool = True,
    ) -> None:
        """`model` is the base (a transformers causal LM); `resolve` maps an adapter name to its store entry
        (raising AdapterNotFound for unknown names). `lora_impl` picks how LoRA rows are computed:
        "batched" (slots and gathered matmuls, `slots.py`) or "peft" (PEFT's `adapter_names`, the reference).
        `max_prefill_tokens` bounds the prompt tokens admitted in one step (one request is always admitted).
        `prefix_cache_bytes` bounds the prompt blocks of `prefix_block` tokens kept for reuse (`prefix.py`;
        0 turns prefix caching off). `short_first_steps`: decoding steps in a row that short requests may run
        without the longer ones (0: every step runs every row). `join_in_step`: requests whose prompts' leading blocks
        are cached join the running rows' decoding forward where the padding it costs them is small (`joining.py`)."""
        self.base_model = model
        self.tokenizer = tokenizer
        self.resolve = resolve
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_context = max_context or int(getattr(model.config, "max_position_embeddings", 2048))
        self.pid = os.getpid()
        # Only the last position's logits are sampled: computing the vocabulary projection for every prompt
        # token would make the LM head most of a prefill's cost.
        takes = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.last_logits_only: dict[str, Any] = {"logits_to_keep": 1} if takes else {}
        self.stop_ids = set(stop_token_ids(tokenizer, generation_eos(model)))
        self.grammars = Grammars(tokenizer, self.stop_ids, int(model.config.vocab_size))  # constrained rows' masks
        self.device = next(model.parameters()).device
        self.waiting: list[Job] = []
        self.cancelled: set[str] = set()
        self.batch = self.batch_class(self.device, max_batch_size)
        self.prompt_cache = PrefixCache(prefix_block, prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        plain = plain_cache(model.config)
        if self.prompt_cache is not None and not plain:
            self.prompt_cache = None  # sliding-window or recurrent layers: cached blocks would not be exact
        self.residency = self.residency_class(
            model,
            resolve,
            lora_impl,
            max_loaded,
            max_loaded_bytes,
            max_rows=max_batch_size,
            evicted=None if self.prompt_cache is None else self.prompt_cache.drop,
        )
        # Steps over the first rows only need every cache layer to be a roomy one (`kvcache.py`).
        self.short_first_steps = short_first_steps if plain else 0
        self.front = 0
        """Rows in front that are short requests (`batch.rows[:front]`)."""
        self.held = 0
        """Decoding steps in a row that the rows behind `front` have waited out."""
        self.idle = True
        """No request has run since the last step that ended with none (when freed memory was handed back)."""
        self.join_in_step = join_in_step
        self.decoded = False
        """This step's admission ran the decoding forward too (`joining.py`)."""

    # ---- requests -------------------------------------------------------------------------------

    def submit(self, req: Job) -> None:
        """Queue `req`; raises, and queues nothing, where it cannot run (InvalidJob, AdapterNotFound)."""
        if not req.prompt_ids:
            raise InvalidJob("empty prompt")
        if len(req.prompt_ids) + 1 > self.max_context:
            raise InvalidJob(f"prompt is {len(req.prompt_ids)} tokens; the context holds {self.max_context}")
        self.residency.check(req)  # unknown adapters fail here, before the request is queued
        self.waiting.append(req)

    def cancel(self, uid: str) -> None:
        """Stop a request (client gone); it leaves the batch at the next step."""
        self.cancelled.add(uid)

    def has_work(self) -> bool:
        return bool(self.waiting or self.batch.rows)

    @property
    def running(self) -> int:
        return len(self.batch.rows)

    # ---- the step -------------------------------------------------------------------------------

    def step(self) -> list[JobEvent]:
        if self.has_work():
            self.idle = False
        events: list[JobEvent] = []
        events += self._drop_cancelled()
        self.decoded = False
        events += self._admit()
        if self.batch.rows and not self.decoded:
            try:
                events += self._decode()
            except Exception as e:  # one failed forward fails the running rows, not the engine
                log.exception("decode step failed")
                events += self.fail_running(forward_failed(e))
        if not self.idle and not self.has_work():  # the last request just left
            self.idle = True
            return_freed_memory()
        return events

    def _admit(self) -> list[JobEvent]:
        events: list[JobEvent] = []
        new: list[Row] = []
        budget = self.max_prefill_tokens  # prompt tokens prefilled in one step: bounds the running rows' wait
        while self.waiting and len(self.batch.rows) + len(new) < self.max_batch_size:
            if new and len(self.waiting[0].prompt_ids) > budget:
                break
            req = self.waiting.pop(0)
            if req.uid in self.cancelled:
                self.cancelled.discard(req.uid)
                events.append(JobEvent(req.uid, "", "cancelled", len(req.prompt_ids), 0))
                continue
            try:
                gen, matcher = generator_for(req), self.grammars.start(req)
                key, load_ms = self.residency.load_job(req)
            except CacheFull:
                self.waiting.insert(0, req)  # retry when a running request frees an adapter
                break
            except Exception as e:  # this request fails; the others of the step go on
                events.append(failed(req.uid, str(e), failure_kind(e), len(req.prompt_ids)))
                continue
            self.residency.acquire(key)
            new.append(Row(req, key, gen, load_ms=load_ms, matcher=matcher))
            budget -= len(req.prompt_ids)
        if not new:
            return events
        try:
            events += self._prefill(new)
        except Exception as e:
            log.exception("prefill failed")
            message = forward_failed(e)
            if any(r is row for r in self.batch.rows for row in new):  # joined a decoding forward: it ran every row
                return events + self.fail_running(message)
            for row in new:
                self.residency.release(row.key)
                events.append(failed(row.req.uid, message, "generation_failed", len(row.req.prompt_ids)))
        return events

    def _prefill(self, new: list[Row]) -> list[JobEvent]:
        """All new prompts in one forward, left-padded. A row starts from past keys and values where it has
        them: a prefix-tuning adapter's prefix, or the prompt's leading blocks from the prefix cache (then only
        the rest of its prompt is computed). Rows of prompt and P-tuning adapters get their virtual tokens in
        front (through input embeddings) and no LoRA; the cache then holds them like prompt tokens."""
        virtual = [self.residency.virtual.get(r.key) for r in new]
        pasts: list[KV | None] = [self.residency.prefixes.get(r.key) for r in new]
        cacheable = [
            self.prompt_cache is not None and v is None and p is None and not logprobs.scores_prompt(r)
            for r, v, p in zip(new, virtual, pasts, strict=True)
        ]
        for i, r in enumerate(new):
            if cacheable[i]:
                assert self.prompt_cache is not None
                r.cached, pasts[i] = self.prompt_cache.lookup(r.key, r.req.prompt_ids)
        todo = [r.req.prompt_ids[r.cached :] for r in new]  # prompt tokens this forward computes
        if joining.fits(self, new, todo, pasts):
            self.decoded = True
            return joining.join_and_decode(self, new, todo, pasts, cacheable)
        lengths = [len(t) + (0 if v is None else v.shape[0]) for t, v in zip(todo, virtual, strict=True)]
        width = max(lengths)
        ids = torch.full((len(new), width), int(self.tokenizer.pad_token_id), dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, (r, n) in enumerate(zip(new, lengths, strict=True)):
            ids[i, width - len(todo[i]) :] = torch.tensor(todo[i])
            mask[i, width - n :] = 1
            r.real_len = n
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs: dict[str, Any] = {"past_key_values": new_cache(self.base_model.config)}
        sizes = [0] * len(new)
        if any(p is not None for p in pasts):  # the prompt attends to its past, positions continue after it
            cache, past_mask, sizes = past_cache(self.base_model.config, pasts)
            inputs["past_key_values"] = cache
            positions = positions + torch.tensor(sizes).unsqueeze(1)
            mask = torch.cat([past_mask, mask], dim=1)
            for r, n in zip(new, sizes, strict=True):
                r.real_len += n
        if any(v is not None for v in virtual):
            with torch.inference_mode():
                embeds = self.base_model.get_input_embeddings()(ids.to(self.device))
                for i, v in enumerate(virtual):
                    if v is not None:
                        start = width - lengths[i]
                        embeds[i, start : start + v.shape[0]] = v
            inputs["inputs_embeds"] = embeds
        else:
            inputs["input_ids"] = ids.to(self.device)
        out = self.residency.forward(
            **inputs,
            **logprobs.logits_to_keep(new, self.last_logits_only),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            adapter_names=[self.residency.lora_name(r.key) for r in new],
        )
        logprobs.score_prompts(new, out.logits)
        if self.prompt_cache is not None:
            joining.keep_blocks(self.prompt_cache, new, cacheable, out.past_key_values, mask.shape[1], first_row=0)
        self.batch.join(new, out.past_key_values, mask)
        self._arrange()
        return self._sample_and_emit(new, out.logits[:, -1, :])

    def _decode(self) -> list[JobEvent]:
        batch = self.batch
        assert batch.mask is not None
        rows = batch.rows[: self._decoding_rows()]  # the rows behind wait this step out
        ids = torch.tensor([[r.next_token] for r in rows], dtype=torch.long)
        column = torch.zeros((len(batch.rows), 1), dtype=torch.long)
        column[: len(rows)] = 1
        batch.mask = torch.cat([batch.mask, column], dim=1)
        positions = torch.tensor([[r.real_len] for r in rows], dtype=torch.long)
        for r in rows:
            r.real_len += 1
        out = self.residency.forward(
            input_ids=ids.to(self.device),
            attention_mask=batch.mask[: len(rows)].to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=batch.cache,
            adapter_names=[self.residency.lora_name(r.key) for r in rows],
            running=True,
        )
        batch.cache = out.past_key_values
        return self._sample_and_emit(rows, out.logits[:, -1, :])

    def _decoding_rows(self) -> int:
        """How many rows, from the front, this decoding step runs: the short ones alone for up to
        `short_first_steps` steps in a row, then every row for one step."""
        if self.front_alone():
            self.held += 1
            return self.front
        self.held = 0
        return len(self.batch.rows)

    def front_alone(self) -> bool:
        """Whether the next decoding step runs the short rows in front alone (the rows behind wait it out)."""
        return 0 < self.front < len(self.batch.rows) and self.held < self.short_first_steps

    def _arrange(self) -> None:
        """Put the short requests in front (after rows joined or left); see `short_first_steps`."""
        rows = self.batch.rows
        if not self.short_first_steps or not rows:
            self.front = 0
            return
        longest = max(r.req.max_tokens for r in rows)
        short = [r.req.max_tokens * SHORT_RATIO <= longest for r in rows]
        self.front = sum(short)
        order = front_first(short)
        if order != sorted(order):
            self.batch.reorder(order)

    def _sample_and_emit(self, rows: list[Row], logits: torch.Tensor) -> list[JobEvent]:
        """The rows' next tokens (after each row's penalties and logit_bias, `penalties.py`) and events, with the
        log-probabilities rows asked for (`logprobs.py`)."""
        return logprobs.scored(rows, logits, self._choose_and_emit)

    def _choose_and_emit(self, rows: list[Row], logits: torch.Tensor) -> list[JobEvent]:
        events: list[JobEvent] = []
        finished: list[Row] = []
        logits = logits.float().cpu()
        self.grammars.mask(rows, logits)
        greedy = logits.argmax(dim=-1).tolist()  # every row's in one kernel; sampling rows draw their own below
        for row, row_logits, best in zip(rows, logits, greedy, strict=True):
            if row.req.temperature > 0 and row.generator is not None:
                token = sample(row_logits, row.req.temperature, row.req.top_p, row.generator)
            else:
                token = best
            self.grammars.accept(row, token)
            reason: FinishReason | None = None
            row.next_token = token  # the next step's input; a stop token's row leaves instead
            if token in self.stop_ids and not row.req.ignore_eos:
                reason = "stop"
            else:
                row.generated.append(token)
                if len(row.generated) >= row.req.max_tokens or row.real_len + 1 >= self.max_context:
                    reason = "length"
            text, hit_stop = new_text(self.tokenizer, row, final=reason is not None)
            if hit_stop:
                reason = "stop"
            if text or reason:
                events.append(
                    JobEvent(
                        row.req.uid,
                        text,
                        reason,
                        len(row.req.prompt_ids),
                        len(row.generated),
                        batch=len(logits),
                        waiting=len(self.waiting),
                        loaded=len(self.residency.lru),
                        load_ms=row.load_ms,
                        cached_tokens=row.cached,
                        loaded_names=self.residency.loaded_names() if reason else None,
                        worker=self.pid,
                        prompt_cache_bytes=0 if self.prompt_cache is None else self.prompt_cache.bytes,
                    )
                )
                row.load_ms = None
            if reason:
                finished.append(row)
        if finished:
            self._retire(finished)
        return events

    # ---- rows leaving ---------------------------------------------------------------------------

    def _retire(self, finished: list[Row]) -> None:
        for r in finished:
            self.residency.release(r.key)
        self.batch.retire(finished)
        self._arrange()

    def _drop_cancelled(self) -> list[JobEvent]:
        if not self.cancelled:
            return []
        gone = [r for r in self.batch.rows if r.req.uid in self.cancelled]
        if gone:
            self._retire(gone)
        # Cancels of waiting requests are applied when they are admitted; any other uid has finished already.
        self.cancelled &= {r.uid for r in self.waiting}
        return [JobEvent(r.req.uid, "", "cancelled", len(r.req.prompt_ids), len(r.generated)) for r in gone]

    def fail_running(self, message: str) -> list[JobEvent]:
        """Fail every running request with `message` (a failed forward: the engine's state after an unexpected error
        is not trusted); waiting requests stay queued."""
        rows = self.batch.rows
        events = [
            failed(r.req.uid, message, "generation_failed", len(r.req.prompt_ids), len(r.generated)) for r in rows
        ]
        for r in rows:
            self.residency.release(r.key)
        self.batch.clear()
        self.front = 0
        return events

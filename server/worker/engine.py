"""A continuous-batching decode engine: one base, many LoRA adapters, chosen per request.

Every `step()` admits waiting requests (their prompts are prefilled together), runs one decoding
forward over all running requests, and retires the ones that finished, so a short answer never
waits for a long one. Which adapter a request uses is request data, never model-global state:
- LoRA rows name their adapter slot (`slots.py`: gathered batched matmuls), or, on the reference
  path, PEFT's per-row `adapter_names`;
- prompt tuning and P-tuning rows get their virtual-token embeddings in front of the prompt's;
- prefix-tuning rows get their per-layer keys and values in their part of the cache;
so one batch mixes every method and the base.

The KV cache is one batched `DynamicCache`, left-padded: rows joining are padded to the common
length and concatenated, rows leaving are dropped, and columns that are padding in every row are
trimmed; its layers keep spare columns, so a decoding step writes in place (`kvcache.py`).
Positions are tracked per row, so padding never shifts a row's rotary positions.

Short requests go first: a request whose `max_tokens` is at most a quarter of the largest running one's sits
in front of the batch, and while such rows run, up to `short_first_steps` decoding steps in a row run them alone
(the rows behind wait those steps out, with a masked column); then one step runs every row. On a CPU a step's
cost grows with its rows, so a short answer beside long ones would otherwise take each of its steps at the full
batch's pace. Requests of similar sizes all decode at every step.

Adapters load lazily from the store on first use into an LRU bounded by count and bytes
(`lru.AdapterLRU`); an adapter with running requests is never evicted. Loaded adapters are keyed by
their weights' sha256, so an adapter replaced on disk under the same name is a new entry, and
requests already running on the old weights finish on them.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from loraswap.adapters.manifest import AdapterNotFound
from loraswap.adapters.prompt import generation_eos, stop_token_ids
from loraswap.adapters.store import StoreEntry
from loraswap.server.jobs import BASE, ErrorKind, FinishReason, Job, JobEvent, failed
from loraswap.server.settings import PREFIX_CACHE_BYTES, LoraImpl
from loraswap.server.worker.kvcache import concat_rows, keep_rows, new_cache
from loraswap.server.worker.kvcache import left_pad as _left_pad  # noqa: F401  # importable from here, as before
from loraswap.server.worker.lru import AdapterLRU, CacheFull
from loraswap.server.worker.prefix import KV, PrefixCache
from loraswap.server.worker.slots import LoraSlots, load_tensors

log = logging.getLogger(__name__)

SHORT_RATIO = 4
"""A request is short, and goes first, when its max_tokens times this is at most the largest running one's."""


class InvalidJob(ValueError):
    """A job this engine cannot run: an empty prompt, or one over the context (the API process checks both first)."""


def failure_kind(e: Exception) -> ErrorKind:
    """The kind of a job's failure before its forward: its adapter is no longer in the store, the job does not fit
    the engine, or its adapter could not be loaded."""
    if isinstance(e, AdapterNotFound):
        return "adapter_not_found"
    if isinstance(e, InvalidJob):
        return "invalid_job"
    return "generation_failed"


def forward_failed(e: BaseException) -> str:
    """The message of every job a failed forward ends (its traceback goes to the log)."""
    detail = str(e).strip().splitlines()
    return f"generation failed: {type(e).__name__}" + (f": {detail[0]}" if detail else "")


@dataclass
class _Row:
    req: Job
    key: str  # loaded adapter key, or BASE
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of decoded text already sent
    real_len: int = 0  # tokens of this row held in the cache
    next_token: int = -1
    load_ms: float | None = None
    cached: int = 0  # leading prompt tokens taken from the prefix cache


class Engine:
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
    ) -> None:
        """`model` is the base (a transformers causal LM); `resolve` maps an adapter name to its store entry
        (raising AdapterNotFound for unknown names). `lora_impl` picks how LoRA rows are computed:
        "batched" (slots and gathered matmuls, `slots.py`) or "peft" (PEFT's `adapter_names`, the reference).
        `max_prefill_tokens` bounds the prompt tokens admitted in one step (one request is always admitted).
        `prefix_cache_bytes` bounds the prompt blocks of `prefix_block` tokens kept for reuse (`prefix.py`;
        0 turns prefix caching off). `short_first_steps`: decoding steps in a row that short requests may run
        without the longer ones (0: every step runs every row)."""
        self.base_model = model
        self.peft: Any = None  # the PeftModel, created with the first adapter (lora_impl "peft")
        # Loads happen before evictions, so one slot more than the LRU holds.
        self.slots = LoraSlots(model, max_loaded + 1, max_rows=max_batch_size) if lora_impl == "batched" else None
        self.tokenizer = tokenizer
        self.resolve = resolve
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_context = max_context or int(getattr(model.config, "max_position_embeddings", 2048))
        self.lru = AdapterLRU(max_loaded, max_loaded_bytes)
        self.names: dict[str, set[str]] = {}  # loaded key -> adapter names (same weights, several names)
        self.pid = os.getpid()
        # Only the last position's logits are sampled: computing the vocabulary projection for every prompt
        # token would make the LM head most of a prefill's cost.
        takes = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.last_logits_only: dict[str, Any] = {"logits_to_keep": 1} if takes else {}
        self.stop_ids = set(stop_token_ids(tokenizer, generation_eos(model)))
        self.device = next(model.parameters()).device
        self.waiting: list[Job] = []
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [rows, cache columns], 1 where the cache holds a real token
        self.cancelled: set[str] = set()
        self.virtual: dict[str, torch.Tensor] = {}  # loaded prompt/P-tuning adapters: key -> virtual tokens
        self.prefixes: dict[str, KV] = {}  # loaded prefix-tuning adapters: key -> their keys and values
        self.prompt_cache = PrefixCache(prefix_block, prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        plain = _plain_cache(model)
        if self.prompt_cache is not None and not plain:
            self.prompt_cache = None  # sliding-window or recurrent layers: cached blocks would not be exact
        # Steps over the first rows only need every cache layer to be a roomy one (`kvcache.py`).
        self.short_first_steps = short_first_steps if plain else 0
        self.front = 0
        """Rows in front that are short requests (`rows[:front]`)."""
        self.held = 0
        """Decoding steps in a row that the rows behind `front` have waited out."""
        self.idle = True
        """No request has run since the last step that ended with none (when freed memory was handed back)."""

    # ---- requests -------------------------------------------------------------------------------

    def submit(self, req: Job) -> None:
        if not req.prompt_ids:
            raise InvalidJob("empty prompt")
        if len(req.prompt_ids) + 1 > self.max_context:
            raise InvalidJob(f"prompt is {len(req.prompt_ids)} tokens; the context holds {self.max_context}")
        if req.adapter is not None:
            self.resolve(req.adapter)  # unknown names fail here, before the request is queued
        self.waiting.append(req)

    def cancel(self, uid: str) -> None:
        """Stop a request (client gone); it leaves the batch at the next step."""
        self.cancelled.add(uid)

    def has_work(self) -> bool:
        return bool(self.waiting or self.rows)

    @property
    def running(self) -> int:
        return len(self.rows)

    # ---- adapters -------------------------------------------------------------------------------

    def _ensure_loaded(self, name: str) -> tuple[str, float | None]:
        """The loaded key of adapter `name`, and the load time in ms if it had to be loaded now."""
        entry = self.resolve(name)
        key = "w" + entry.manifest.weights_sha256[:20]
        if key in self.lru:
            self.lru.touch(key)
            return key, None
        method = entry.manifest.method
        size = entry.size_bytes
        evict = self.lru.plan_load(key, size)
        start = time.perf_counter()
        if method in ("prompt", "ptuning"):
            self.virtual[key] = self._load_virtual_tokens(entry)
        elif method == "prefix":
            self.prefixes[key] = self._load_prefix(entry)
        elif self.slots is not None:
            self.slots.load(key, entry.path)
        elif self.peft is None:
            from peft import PeftModel

            self.peft = PeftModel.from_pretrained(self.base_model, str(entry.path), adapter_name=key)
            self.peft.eval()
        else:
            self.peft.load_adapter(str(entry.path), adapter_name=key)
        load_ms = 1000 * (time.perf_counter() - start)
        self.lru.added(key, size)
        self.names.setdefault(key, set()).add(name)
        for old in evict:  # only after the new one loaded: a failed load evicts nothing
            if self.virtual.pop(old, None) is None and self.prefixes.pop(old, None) is None:
                if self.slots is not None:
                    self.slots.unload(old)
                else:
                    self.peft.delete_adapter(old)
            self.lru.removed(old)
            self.names.pop(old, None)
            if self.prompt_cache is not None:
                self.prompt_cache.drop(old)
        return key, load_ms

    def _load_virtual_tokens(self, entry: StoreEntry) -> torch.Tensor:
        """Prompt tuning and P-tuning adapters are stored as their final virtual-token embeddings
        ([virtual tokens, hidden]); serving one means putting them in front of the prompt's embeddings."""
        table = load_tensors(entry.path / "adapter_model.safetensors")["prompt_embeddings"]
        embed = self.base_model.get_input_embeddings().weight
        if table.ndim != 2 or table.shape[1] != embed.shape[1]:
            raise ValueError(
                f"adapter {entry.name!r}: prompt embeddings of shape {list(table.shape)} do not fit "
                f"hidden size {embed.shape[1]}"
            )
        return table.to(device=embed.device, dtype=embed.dtype)

    # ---- the step -------------------------------------------------------------------------------

    def step(self) -> list[JobEvent]:
        if self.has_work():
            self.idle = False
        events: list[JobEvent] = []
        events += self._drop_cancelled()
        events += self._admit()
        if self.rows:
            try:
                events += self._decode()
            except Exception as e:  # one failed forward fails the running rows, not the engine
                log.exception("decode step failed")
                events += self.fail_running(forward_failed(e))
        if not self.idle and not self.has_work():  # the last request just left
            self.idle = True
            return_freed_memory()
        return events

    def _forward(self, running: bool = False, **kwargs: Any) -> Any:
        """One forward of the base over rows that each name their adapter (`adapter_names`); `running`: the rows are
        the running batch's, in its order (a decoding step), so the LoRA slots keep them gathered between steps."""
        names = kwargs.pop("adapter_names")
        if self.slots is not None:
            self.slots.use([None if n == BASE else n for n in names], running=running)
            try:
                with torch.inference_mode():
                    return self.base_model(**kwargs, use_cache=True)
            finally:
                self.slots.clear()
        try:
            with torch.inference_mode():
                if self.peft is None:
                    return self.base_model(**kwargs, use_cache=True)
                return self.peft(**kwargs, adapter_names=names, use_cache=True)
        except BaseException:
            _remove_adapter_name_hooks(self.peft)  # peft#3475: hooks survive an exception
            raise

    def _admit(self) -> list[JobEvent]:
        events: list[JobEvent] = []
        new: list[_Row] = []
        budget = self.max_prefill_tokens  # prompt tokens prefilled in one step: bounds the running rows' wait
        while self.waiting and len(self.rows) + len(new) < self.max_batch_size:
            if new and len(self.waiting[0].prompt_ids) > budget:
                break
            req = self.waiting.pop(0)
            if req.uid in self.cancelled:
                self.cancelled.discard(req.uid)
                events.append(JobEvent(req.uid, "", "cancelled", len(req.prompt_ids), 0))
                continue
            try:
                gen = None
                if req.temperature > 0:
                    gen = torch.Generator(device="cpu")
                    seed = req.seed if req.seed is not None else int.from_bytes(req.uid.encode()[:8], "big")
                    gen.manual_seed(seed % 2**64)
                key, load_ms = (BASE, None) if req.adapter is None else self._ensure_loaded(req.adapter)
            except CacheFull:
                self.waiting.insert(0, req)  # retry when a running request frees an adapter
                break
            except Exception as e:  # this request fails; the others of the step go on
                events.append(failed(req.uid, str(e), failure_kind(e), len(req.prompt_ids)))
                continue
            if key != BASE:
                self.lru.acquire(key)
            new.append(_Row(req, key, gen, load_ms=load_ms))
            budget -= len(req.prompt_ids)
        if not new:
            return events
        try:
            events += self._prefill(new)
        except Exception as e:
            log.exception("prefill failed")
            message = forward_failed(e)
            for row in new:
                self._release(row)
                events.append(failed(row.req.uid, message, "generation_failed", len(row.req.prompt_ids)))
        return events

    def _load_prefix(self, entry: StoreEntry) -> KV:
        """A prefix-tuning adapter as keys and values of [layers, kv heads, virtual tokens, head dim], laid
        out as PEFT's `get_prompt` lays them out (for grouped-query attention, PEFT trains one prefix per
        key-value head)."""
        import json

        config = json.loads((entry.path / "adapter_config.json").read_text())
        table = load_tensors(entry.path / "adapter_model.safetensors")["prompt_embeddings"]
        n, layers, heads, dim = table.shape[0], config["num_layers"], config["num_attention_heads"], config["token_dim"]
        if table.shape[1] != layers * 2 * dim or config.get("num_transformer_submodules", 1) != 1:
            raise ValueError(f"adapter {entry.name!r}: prefix of shape {list(table.shape)} does not fit this base")
        kv = table.view(n, layers * 2, heads, dim // heads).permute(1, 2, 0, 3)  # [layers*2, heads, n, head dim]
        ref = self.base_model.get_input_embeddings().weight
        kv = kv.to(device=ref.device, dtype=ref.dtype)
        return kv[0::2], kv[1::2]

    def _past(self, pasts: list[KV | None]) -> tuple[Any, torch.Tensor, list[int]]:
        """A cache holding each row's past keys and values (right-aligned, zeros and mask 0 elsewhere)."""
        sizes = [0 if p is None else p[0].shape[2] for p in pasts]
        width = max(sizes)
        some = next(p for p in pasts if p is not None)
        layers, heads, _, dim = some[0].shape
        keys = some[0].new_zeros(layers, len(pasts), heads, width, dim)
        values = keys.clone()
        for i, p in enumerate(pasts):
            if p is not None:
                keys[:, i, :, width - sizes[i] :] = p[0]
                values[:, i, :, width - sizes[i] :] = p[1]
        cache = new_cache(self.base_model.config)
        for layer in range(layers):
            cache.update(keys[layer], values[layer], layer)
        mask = torch.zeros((len(pasts), width), dtype=torch.long)
        for i, n in enumerate(sizes):
            mask[i, width - n :] = 1
        return cache, mask, sizes

    def _prefill(self, new: list[_Row]) -> list[JobEvent]:
        """All new prompts in one forward, left-padded. A row starts from past keys and values where it has
        them: a prefix-tuning adapter's prefix, or the prompt's leading blocks from the prefix cache (then only
        the rest of its prompt is computed). Rows of prompt and P-tuning adapters get their virtual tokens in
        front (through input embeddings) and no LoRA; the cache then holds them like prompt tokens."""
        virtual = [self.virtual.get(r.key) for r in new]
        pasts: list[KV | None] = [self.prefixes.get(r.key) for r in new]
        cacheable = [
            self.prompt_cache is not None and v is None and p is None for v, p in zip(virtual, pasts, strict=True)
        ]
        for i, r in enumerate(new):
            if cacheable[i]:
                assert self.prompt_cache is not None
                r.cached, pasts[i] = self.prompt_cache.lookup(r.key, r.req.prompt_ids)
        todo = [r.req.prompt_ids[r.cached :] for r in new]  # prompt tokens this forward computes
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
            cache, past_mask, sizes = self._past(pasts)
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
        out = self._forward(
            **inputs,
            **self.last_logits_only,
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            adapter_names=[self._lora_name(r) for r in new],
        )
        if self.prompt_cache is not None:
            self._keep_blocks(new, cacheable, out.past_key_values, mask.shape[1])
        self._merge(out.past_key_values, mask)
        self.rows += new
        self._arrange()
        return self._sample_and_emit(new, out.logits[:, -1, :])

    def _keep_blocks(self, new: list[_Row], cacheable: list[bool], cache: Any, columns: int) -> None:
        """Hand the prefix cache the keys and values this prefill computed for the prompts' leading blocks.
        Row i's prompt ends at the last cache column; its token t sits `len(prompt) - t` columns before the end."""
        assert self.prompt_cache is not None
        for i, r in enumerate(new):
            if not cacheable[i]:
                continue
            n = len(r.req.prompt_ids)

            def kv(t0: int, t1: int, i: int = i, n: int = n) -> KV:
                c0, c1 = columns - (n - t0), columns - (n - t1)
                keys = torch.stack([layer.keys[i, :, c0:c1] for layer in cache.layers])
                values = torch.stack([layer.values[i, :, c0:c1] for layer in cache.layers])
                return keys, values

            self.prompt_cache.store(r.key, r.req.prompt_ids, r.cached, kv)

    def _lora_name(self, row: _Row) -> str:
        return BASE if row.key in self.virtual or row.key in self.prefixes else row.key

    def _decode(self) -> list[JobEvent]:
        assert self.mask is not None
        rows = self.rows[: self._decoding_rows()]  # the rows behind wait this step out
        ids = torch.tensor([[r.next_token] for r in rows], dtype=torch.long)
        column = torch.zeros((len(self.rows), 1), dtype=torch.long)
        column[: len(rows)] = 1
        self.mask = torch.cat([self.mask, column], dim=1)
        positions = torch.tensor([[r.real_len] for r in rows], dtype=torch.long)
        for r in rows:
            r.real_len += 1
        out = self._forward(
            input_ids=ids.to(self.device),
            attention_mask=self.mask[: len(rows)].to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=self.cache,
            adapter_names=[self._lora_name(r) for r in rows],
            running=True,
        )
        self.cache = out.past_key_values
        return self._sample_and_emit(rows, out.logits[:, -1, :])

    def _decoding_rows(self) -> int:
        """How many rows, from the front, this decoding step runs: the short ones alone for up to
        `short_first_steps` steps in a row, then every row for one step."""
        if 0 < self.front < len(self.rows) and self.held < self.short_first_steps:
            self.held += 1
            return self.front
        self.held = 0
        return len(self.rows)

    def _arrange(self) -> None:
        """Put the short requests in front (after rows joined or left); see `short_first_steps`."""
        if not self.short_first_steps or not self.rows:
            self.front = 0
            return
        longest = max(r.req.max_tokens for r in self.rows)
        short = [r.req.max_tokens * SHORT_RATIO <= longest for r in self.rows]
        self.front = sum(short)
        order = front_first(short)
        if order != sorted(order):
            assert self.mask is not None
            index = torch.tensor(order, dtype=torch.long)
            self.rows = [self.rows[i] for i in order]
            self.mask = self.mask[index]
            keep_rows(self.cache, index.to(self.device), 0)

    def _sample_and_emit(self, rows: list[_Row], logits: torch.Tensor) -> list[JobEvent]:
        events: list[JobEvent] = []
        finished: list[_Row] = []
        logits = logits.float().cpu()
        greedy = logits.argmax(dim=-1).tolist()  # every row's in one kernel; sampling rows draw their own below
        for row, row_logits, best in zip(rows, logits, greedy, strict=True):
            if row.req.temperature > 0 and row.generator is not None:
                token = _sample(row_logits, row.req.temperature, row.req.top_p, row.generator)
            else:
                token = best
            reason: FinishReason | None = None
            if token in self.stop_ids and not row.req.ignore_eos:
                reason = "stop"
            else:
                row.generated.append(token)
                row.next_token = token
                if len(row.generated) >= row.req.max_tokens or row.real_len + 1 >= self.max_context:
                    reason = "length"
            text, hit_stop = self._new_text(row, final=reason is not None)
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
                        loaded=len(self.lru),
                        load_ms=row.load_ms,
                        cached_tokens=row.cached,
                        loaded_names=tuple(sorted(set().union(*self.names.values()))) if reason else None,
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

    def _new_text(self, row: _Row, final: bool) -> tuple[str, bool]:
        """Text decoded since the last event. Held back: an incomplete UTF-8 character, and a tail that
        could be the start of a stop string. A stop string ends the text before it."""
        full = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        for s in row.req.stop:
            at = full.find(s, max(0, row.emitted - len(s)))
            if at != -1:
                text = full[row.emitted : at] if at > row.emitted else ""
                row.emitted = max(row.emitted, at)
                return text, True
        end = len(full)
        if not final:
            if full.endswith("\ufffd"):
                end = len(full.rstrip("\ufffd"))
            for s in row.req.stop:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if full[:end].endswith(s[:k]):
                        end -= k
                        break
        end = max(end, row.emitted)
        text = full[row.emitted : end]
        row.emitted = end
        return text, False

    # ---- cache bookkeeping ----------------------------------------------------------------------

    def _merge(self, joining: Any, new_mask: torch.Tensor) -> None:
        if self.cache is None or not self.rows:
            self.cache, self.mask = joining, new_mask
            return
        assert self.mask is not None
        old_len, new_len = self.mask.shape[1], new_mask.shape[1]
        width = max(old_len, new_len)
        concat_rows(self.cache, joining, width, capacity=self.max_batch_size)
        self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(new_mask, width)], dim=0)

    def _drop_rows(self, finished: list[_Row]) -> torch.Tensor | None:
        """Release the finished rows' adapters and drop them from `rows`; returns the old index of each
        remaining row in its new place, or None (and no batch state) when none remain. Each gap a finished row
        leaves is filled by a remaining row from the end, so the cache copies only the rows that move."""
        gone = {id(r) for r in finished}
        for r in finished:
            self._release(r)
        left = len(self.rows) - len(gone)
        order = list(range(left))
        gaps = [i for i in range(left) if id(self.rows[i]) in gone]
        tail = [j for j in range(left, len(self.rows)) if id(self.rows[j]) not in gone]
        for i, j in zip(gaps, tail, strict=True):
            order[i] = j
        self.rows = [self.rows[i] for i in order]
        if not self.rows:
            self.cache, self.mask, self.front = None, None, 0
            return None
        return torch.tensor(order, dtype=torch.long)

    def _retire(self, finished: list[_Row]) -> None:
        index = self._drop_rows(finished)
        if index is None:
            return
        assert self.mask is not None
        self.mask = self.mask[index]
        # Columns that are padding in every remaining row are dropped.
        first = int(self.mask.any(dim=0).long().argmax())
        self.mask = self.mask[:, first:]
        keep_rows(self.cache, index.to(self.device), first)
        self._arrange()

    def _release(self, row: _Row) -> None:
        if row.key != BASE:
            self.lru.release(row.key)

    def _drop_cancelled(self) -> list[JobEvent]:
        if not self.cancelled:
            return []
        gone = [r for r in self.rows if r.req.uid in self.cancelled]
        if gone:
            self._retire(gone)
        # Cancels of waiting requests are applied when they are admitted; any other uid has finished already.
        self.cancelled &= {r.uid for r in self.waiting}
        return [JobEvent(r.req.uid, "", "cancelled", len(r.req.prompt_ids), len(r.generated)) for r in gone]

    def fail_running(self, message: str) -> list[JobEvent]:
        """Fail every running request with `message` (a failed forward: the engine's state after an unexpected error
        is not trusted); waiting requests stay queued."""
        events = [
            failed(r.req.uid, message, "generation_failed", len(r.req.prompt_ids), len(r.generated)) for r in self.rows
        ]
        for r in self.rows:
            self._release(r)
        self.rows, self.cache, self.mask, self.front = [], None, None, 0
        return events


def front_first(front: list[bool]) -> list[int]:
    """An order of rows (new position -> old position) with the rows marked True in front, moving as few rows as
    possible: each marked row behind the front region trades places with an unmarked row inside it."""
    k = sum(front)
    order = list(range(len(front)))
    inside = [i for i in range(k) if not front[i]]
    behind = [j for j in range(k, len(front)) if front[j]]
    for i, j in zip(inside, behind, strict=True):
        order[i], order[j] = j, i
    return order


def return_freed_memory() -> None:
    """Hand the pages of freed heap memory back to the system (glibc's `malloc_trim`; nothing elsewhere). A batch's
    activations, adapter load buffers and evicted prompt blocks are freed into the allocator's free lists, which
    keep their pages resident: without this, a worker's resident memory follows the most it ever held, not what
    it holds. A few ms; the engine calls it when its last request leaves, never between steps of a batch."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _plain_cache(model: Any) -> bool:
    """Whether every layer of the model's cache keeps every token's keys and values (no sliding window, no
    recurrent state): only then are cached prompt blocks the same as recomputed ones."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except Exception:
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _left_pad_mask(m: torch.Tensor, width: int) -> torch.Tensor:
    pad = width - m.shape[1]
    return m if pad == 0 else torch.cat([m.new_zeros(m.shape[0], pad), m], dim=1)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _remove_adapter_name_hooks(model: Any) -> None:
    """Remove PEFT's per-call `adapter_names` pre-forward hooks left behind by a failed forward."""
    if model is None:
        return
    for module in model.modules():
        for hid, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, functools.partial) and hook.func.__name__ == "_adapter_names_pre_forward_hook":
                del module._forward_pre_hooks[hid]
                module._forward_pre_hooks_with_kwargs.pop(hid, None)

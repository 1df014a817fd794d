"""Adapter residency: which adapters a worker's engine holds, where, and the forward that uses them per row.

Adapters load lazily from the store on first use into an LRU bounded by count and bytes (`lru.AdapterLRU`); an
adapter with running requests is never evicted, and a new one is loaded before any other is evicted (a failed load
evicts nothing). Loaded adapters are keyed by their weights' sha256, so an adapter replaced on disk under the same
name is a new entry, and requests already running on the old weights finish on them.

Where each kind is held:
- LoRA adapters in a slot of `slots.LoraSlots` (gathered batched matmuls), or, on the reference path
  (lora_impl "peft"), as PEFT adapters run with per-row `adapter_names`;
- prompt tuning and P-tuning adapters as their virtual-token embeddings, which the engine puts in front of a
  row's prompt embeddings;
- prefix-tuning adapters as their per-layer keys and values, which the engine puts in the row's part of the cache.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from loraswap.adapters.store import StoreEntry
from loraswap.server.jobs import BASE, Job
from loraswap.server.settings import LoraImpl
from loraswap.server.worker.failures import InvalidJob
from loraswap.server.worker.lru import AdapterLRU
from loraswap.server.worker.mixing import mix_key, parse_mix
from loraswap.server.worker.prefix import KV
from loraswap.server.worker.slots import LoraSlots, load_tensors


class Residency:
    def __init__(
        self,
        model: Any,
        resolve: Callable[[str], StoreEntry],
        lora_impl: LoraImpl,
        max_loaded: int,
        max_loaded_bytes: int,
        max_rows: int,
        evicted: Callable[[str], None] | None = None,
    ) -> None:
        """`model` is the base; `resolve` maps an adapter name to its store entry (raising AdapterNotFound for
        unknown names); `evicted` is told the key of each adapter evicted (the prefix cache drops its blocks)."""
        self.base_model = model
        self.resolve = resolve
        self.peft: Any = None  # the PeftModel, created with the first adapter (lora_impl "peft")
        # Loads happen before evictions, so one slot more than the LRU holds.
        self.slots = LoraSlots(model, max_loaded + 1, max_rows=max_rows) if lora_impl == "batched" else None
        self.lru = AdapterLRU(max_loaded, max_loaded_bytes)
        self.names: dict[str, set[str]] = {}  # loaded key -> adapter names (same weights, several names)
        self.virtual: dict[str, torch.Tensor] = {}  # loaded prompt/P-tuning adapters: key -> virtual tokens
        self.prefixes: dict[str, KV] = {}  # loaded prefix-tuning adapters: key -> their keys and values
        self.evicted = evicted

    def ensure_loaded(self, name: str) -> tuple[str, float | None]:
        """The loaded key of adapter `name`, and the load time in ms if it had to be loaded now (CacheFull when
        every loaded adapter is in use)."""
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
            self.virtual[key] = self.load_virtual_tokens(entry)
        elif method == "prefix":
            self.prefixes[key] = self.load_prefix(entry)
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
            if self.evicted is not None:
                self.evicted(old)
        return key, load_ms

    def check(self, job: Job) -> None:
        """Raise (AdapterNotFound) if an adapter the job names is not in the store."""
        for name in [job.adapter] if job.adapter else [n for n, _ in job.mixture]:
            self.resolve(name)

    def load_job(self, job: Job) -> tuple[str, float | None]:
        """The key a job's rows run on: BASE, its adapter's (`ensure_loaded`) or its mixture's (`mixing.mix_key`),
        with the time spent loading, in ms, if anything had to be loaded for it."""
        if not job.mixture:
            return (BASE, None) if job.adapter is None else self.ensure_loaded(job.adapter)
        if self.slots is None:
            raise InvalidJob("adapter mixtures are computed in the LoRA slots; this server runs lora_impl 'peft'")
        weights: dict[str, float] = {}
        total: float | None = None
        try:
            for name, weight in job.mixture:
                key, load_ms = self.ensure_loaded(name)
                if key in self.virtual or key in self.prefixes:
                    raise InvalidJob(f"adapter {name!r} is not a LoRA adapter; only LoRA adapters mix")
                self.lru.acquire(key)  # held while the others load, so that loading them cannot evict it
                weights[key] = weights.get(key, 0.0) + weight
                if load_ms is not None:
                    total = (total or 0.0) + load_ms
        finally:
            for key in weights:
                self.lru.release(key)
        return mix_key(tuple(weights.items())), total

    def _parts(self, key: str) -> list[str]:
        """The loaded adapters behind a row's key."""
        if key == BASE:
            return []
        mix = parse_mix(key)
        return [key] if mix is None else [k for k, _ in mix]

    def acquire(self, key: str) -> None:
        """A running row uses adapter `key` (BASE: none; a mixture: each of its adapters); it is not evicted until
        released."""
        for k in self._parts(key):
            self.lru.acquire(k)

    def release(self, key: str) -> None:
        for k in self._parts(key):
            self.lru.release(k)

    def lora_name(self, key: str) -> str:
        """What a row of adapter `key` names in a forward's `adapter_names`: BASE for prompt-learning and prefix
        adapters, which change the row's inputs or cache and leave the base's weights as they are."""
        return BASE if key in self.virtual or key in self.prefixes else key

    def loaded_names(self) -> tuple[str, ...]:
        """The names of the loaded adapters, sorted."""
        return tuple(sorted(set().union(*self.names.values())))

    def forward(self, running: bool = False, **kwargs: Any) -> Any:
        """One forward of the base over rows that each name their adapter (`adapter_names`); `running`: the rows are
        the running batch's, in its order (a decoding step), so the LoRA slots keep them gathered between steps."""
        names = kwargs.pop("adapter_names")
        if self.slots is not None:
            self.slots.use([None if n == BASE else parse_mix(n) or n for n in names], running=running)
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

    def load_virtual_tokens(self, entry: StoreEntry) -> torch.Tensor:
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

    def load_prefix(self, entry: StoreEntry) -> KV:
        """A prefix-tuning adapter as keys and values of [layers, kv heads, virtual tokens, head dim], laid
        out as PEFT's `get_prompt` lays them out (for grouped-query attention, PEFT trains one prefix per
        key-value head)."""
        config = json.loads((entry.path / "adapter_config.json").read_text())
        table = load_tensors(entry.path / "adapter_model.safetensors")["prompt_embeddings"]
        n, layers, heads, dim = table.shape[0], config["num_layers"], config["num_attention_heads"], config["token_dim"]
        if table.shape[1] != layers * 2 * dim or config.get("num_transformer_submodules", 1) != 1:
            raise ValueError(f"adapter {entry.name!r}: prefix of shape {list(table.shape)} does not fit this base")
        kv = table.view(n, layers * 2, heads, dim // heads).permute(1, 2, 0, 3)  # [layers*2, heads, n, head dim]
        ref = self.base_model.get_input_embeddings().weight
        kv = kv.to(device=ref.device, dtype=ref.dtype)
        return kv[0::2], kv[1::2]


def _remove_adapter_name_hooks(model: Any) -> None:
    """Remove PEFT's per-call `adapter_names` pre-forward hooks left behind by a failed forward."""
    if model is None:
        return
    for module in model.modules():
        for hid, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, functools.partial) and hook.func.__name__ == "_adapter_names_pre_forward_hook":
                del module._forward_pre_hooks[hid]
                module._forward_pre_hooks_with_kwargs.pop(hid, None)

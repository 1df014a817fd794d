"""What the engine's tests share: an engine on the tiny base, a store of two random LoRA adapters, random PEFT
adapters of any config, a batch of prompts, a run to the end, and the PEFT reference an answer must match."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import peft_reference, random_lora_adapter

from loraswap.adapters.base import load_base
from loraswap.adapters.store import AdapterStore
from loraswap.server.jobs import JobEvent
from loraswap.server.settings import LoraImpl
from loraswap.server.worker.engine import Engine


def lora_store(lively_base: Path, out: Path) -> AdapterStore:
    """Two random LoRA adapters for the tiny base, "symptoms" and "treatment", in `out`."""
    random_lora_adapter(lively_base, out, "symptoms", seed=1)
    random_lora_adapter(lively_base, out, "treatment", seed=2)
    return AdapterStore(out, shipped_dir=None)


PROMPTS = torch.tensor([[1, 5, 9, 14, 3, 7], [2, 8, 8, 11, 4, 6], [3, 3, 12, 5, 9, 1], [4, 10, 2, 6, 13, 8]])
"""Four prompts of six token ids of the tiny bases' vocabulary, one per row of a test batch."""


def peft_adapter(base_path: Path, out: Path, seed: int, **config: Any) -> Path:
    """A PEFT LoRA adapter with random non-zero weights and the given LoraConfig fields."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    cfg = {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False} | config
    get_peft_model(model, LoraConfig(**cfg)).save_pretrained(str(out))
    return out


IMPLS = pytest.mark.parametrize("impl", ["batched", "peft"])


def make_engine(lively_base: Path, store: AdapterStore, impl: LoraImpl = "batched", **kw: int | bool) -> Engine:
    base = load_base(str(lively_base), quant="none")
    return Engine(base.model, base.tokenizer, store.get, lora_impl=impl, **kw)


def run_all(engine: Engine, max_steps: int = 500) -> dict[str, list[JobEvent]]:
    events: dict[str, list[JobEvent]] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for e in engine.step():
            events.setdefault(e.uid, []).append(e)
    assert not engine.has_work()
    return events


def solo_reference(lively_base: Path, store: AdapterStore, adapter: str | None, question: str, n: int) -> list[int]:
    return peft_reference(lively_base, None if adapter is None else store.get(adapter).path, question, n)


def text_of(events: list[JobEvent]) -> str:
    return "".join(e.text for e in events)

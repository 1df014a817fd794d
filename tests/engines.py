"""What the engine's tests share: an engine on the tiny base, a store of two random LoRA adapters, a run to the
end, and the PEFT reference an answer must match."""

from __future__ import annotations

from pathlib import Path

import pytest
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


IMPLS = pytest.mark.parametrize("impl", ["batched", "peft"])


def make_engine(lively_base: Path, store: AdapterStore, impl: LoraImpl = "batched", **kw: int) -> Engine:
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

"""Batched multi-LoRA slots against PEFT, the reference: same logits for mixed batches, refusals, reuse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from loraswap.adapters.manifest import AdapterError
from loraswap.server.slots import LoraSlots

PROMPTS = torch.tensor([[1, 5, 9, 14, 3, 7], [2, 8, 8, 11, 4, 6], [3, 3, 12, 5, 9, 1], [4, 10, 2, 6, 13, 8]])


def peft_adapter(base_path: Path, out: Path, seed: int, **config: Any) -> Path:
    """A PEFT LoRA adapter with random non-zero weights and the given LoraConfig fields."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    cfg = {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False} | config
    get_peft_model(model, LoraConfig(**cfg)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapters(lively_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slots")
    return {
        "qv8": peft_adapter(lively_base, root / "qv8", 1),
        "qv4": peft_adapter(lively_base, root / "qv4", 2, r=4, lora_alpha=8),
        "all16rs": peft_adapter(
            lively_base,
            root / "all16rs",
            3,
            r=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            use_rslora=True,
        ),
        "pattern": peft_adapter(lively_base, root / "pattern", 4, alpha_pattern={"v_proj": 64}),
    }


def reference_logits(base_path: Path, adapter: Path | None, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base_path)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.inference_mode():
        return model(ids).logits


def test_a_mixed_batch_gives_each_row_its_adapters_logits(lively_base: Path, adapters: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lively_base)
    slots = LoraSlots(model, capacity=4)
    for name, path in adapters.items():
        slots.load(name, path)
    for rows in (["qv8", "qv4", "all16rs", "pattern"], ["pattern", None, "qv8", "all16rs"], ["qv4"] * 4):
        slots.use(list(rows))
        with torch.inference_mode():
            mixed = model(PROMPTS).logits
        slots.clear()
        for i, name in enumerate(rows):
            ref = reference_logits(lively_base, None if name is None else adapters[name], PROMPTS[i : i + 1])
            torch.testing.assert_close(mixed[i : i + 1], ref, atol=2e-5, rtol=1e-4)
    # With no adapter in use the model is the base, exactly.
    with torch.inference_mode():
        torch.testing.assert_close(model(PROMPTS).logits, reference_logits(lively_base, None, PROMPTS), atol=0, rtol=0)


def test_adapters_that_the_batched_path_cannot_compute_are_refused(lively_base: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    slots = LoraSlots(AutoModelForCausalLM.from_pretrained(lively_base), capacity=2)
    dora = peft_adapter(lively_base, tmp_path / "dora", 5, use_dora=True)
    with pytest.raises(AdapterError, match="DoRA"):
        slots.load("dora", dora)
    embed = peft_adapter(lively_base, tmp_path / "embed", 6, target_modules=["embed_tokens"])
    with pytest.raises(AdapterError, match="only linear layers"):
        slots.load("embed", embed)
    assert len(slots) == 0 and len(slots.free) == 2  # nothing half-loaded


def test_slots_are_reused_without_new_memory(lively_base: Path, adapters: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    slots = LoraSlots(AutoModelForCausalLM.from_pretrained(lively_base), capacity=2)
    slots.load("keep", adapters["qv8"])
    layer = next(iter(slots.layers.values()))
    storage = (layer.A.data_ptr(), layer.B.data_ptr())
    for i in range(300):
        slots.load(f"churn{i}", adapters["qv4"])
        slots.unload(f"churn{i}")
    assert (layer.A.data_ptr(), layer.B.data_ptr()) == storage
    assert len(slots) == 1 and sorted(slots.free) == [2]
    with pytest.raises(AdapterError, match="slots are in use"):
        slots.load("a", adapters["qv4"])
        slots.load("b", adapters["qv4"])

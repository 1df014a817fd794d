"""Adapter mixtures per row: a row summing several adapters' LoRA deltas equals PEFT with the same adapters
combined at the same weights, in a batch that also holds plain-adapter and base rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from engines import PROMPTS, peft_adapter

from loraswap.server.worker.mixing import mix_key, parse_mix
from loraswap.server.worker.slots import LoraSlots


@pytest.fixture(scope="module")
def adapters(lively_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mix")
    return {
        "a": peft_adapter(lively_base, root / "a", 11),
        # Another rank, scale and set of layers: the mixture pads ranks and leaves layers an adapter lacks alone.
        "b": peft_adapter(lively_base, root / "b", 12, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]),
        "c": peft_adapter(lively_base, root / "c", 13, r=16, use_rslora=True),
    }


def peft_mixture_logits(base: Path, adapters: dict[str, Path], weights: dict[str, float], ids: torch.Tensor) -> Any:
    """PEFT's logits with `weights`' adapters combined by `add_weighted_adapter(combination_type="cat")`, which
    stacks the weighted adapters along the rank: the sum of their deltas, exactly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(weights)
    model: Any = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), str(adapters[names[0]]), adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.add_weighted_adapter(names, [weights[n] for n in names], "mixed", combination_type="cat")
    model.set_adapter("mixed")
    with torch.inference_mode():
        return model(ids).logits


def plain_logits(base: Path, adapter: Path | None, ids: torch.Tensor) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.inference_mode():
        return model(ids).logits


def test_a_mixture_row_equals_peft_with_the_same_adapters_at_the_same_weights(
    lively_base: Path, adapters: dict[str, Path]
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lively_base)
    slots = LoraSlots(model, capacity=4)
    for name, path in adapters.items():
        slots.load(name, path)
    two = {"a": 0.7, "b": 0.3}
    three = {"a": 0.5, "b": 1.5, "c": 0.25}
    rows: list[Any] = [tuple(two.items()), "c", None, tuple(three.items())]  # mixtures beside a plain row and base
    slots.use(rows)
    with torch.inference_mode():
        mixed = model(PROMPTS).logits
    slots.clear()
    torch.testing.assert_close(
        mixed[0:1], peft_mixture_logits(lively_base, adapters, two, PROMPTS[0:1]), atol=5e-5, rtol=1e-4
    )
    # Each reference runs its row alone, and a batch of four sums its float32 products in another order (3.4e-5 apart
    # at most on an AMD EPYC's kernels): every row gets the mixtures' tolerance.
    torch.testing.assert_close(mixed[1:2], plain_logits(lively_base, adapters["c"], PROMPTS[1:2]), atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[2:3], plain_logits(lively_base, None, PROMPTS[2:3]), atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(
        mixed[3:4], peft_mixture_logits(lively_base, adapters, three, PROMPTS[3:4]), atol=5e-5, rtol=1e-4
    )
    # The mixture is not one of its parts: the weights matter.
    assert not torch.allclose(mixed[0:1], plain_logits(lively_base, adapters["a"], PROMPTS[0:1]), atol=1e-3)


def test_a_mixture_key_names_its_adapters_and_weights_in_any_order() -> None:
    key = mix_key((("wb", 0.3), ("wa", 0.7)))
    assert key == mix_key((("wa", 0.7), ("wb", 0.3)))
    assert parse_mix(key) == (("wa", 0.7), ("wb", 0.3))
    assert parse_mix("w0123") is None


def test_the_soft_route_mixes_the_likely_qtypes_that_have_adapters() -> None:
    from loraswap.server.api.mixtures import soft_weights

    ranked = [("symptoms", 0.6), ("causes", 0.2), ("treatment", 0.15), ("outlook", 0.04), ("stages", 0.01)]
    adapters = {"symptoms": "sym", "treatment": "treat", "outlook": "out", "stages": "st"}
    mix = soft_weights(ranked, adapters.get, max_mix=4)
    # "causes" has no adapter; "outlook" and "stages" fall under the 5% floor; the rest renormalised.
    assert [(q, a) for q, a, _ in mix] == [("symptoms", "sym"), ("treatment", "treat")]
    assert [round(w, 4) for _, _, w in mix] == [0.8, 0.2]
    assert [q for q, _, _ in soft_weights(ranked, adapters.get, max_mix=1)] == ["symptoms"]
    assert soft_weights(ranked, {}.get, max_mix=4) == []
    # Where the top qtype has no adapter, the next ones lead.
    assert soft_weights([("causes", 0.9), ("symptoms", 0.1)], adapters.get, 4) == [("symptoms", "sym", 1.0)]

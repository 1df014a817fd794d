"""PEFT's LoRA format as adapters/lora.py reads it: tensor names, pairs, the modules a config targets, rank and
scale, each checked against PEFT itself on a tiny Llama built on the meta device (no weights)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from loraswap.adapters.lora import (
    LoraTensor,
    describe_targets,
    lora_pairs,
    lora_rank,
    lora_scale,
    parse_tensor_name,
    short_names,
    targeted_modules,
    tensor_modules,
)
from loraswap.adapters.manifest import AdapterError

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("name", "want"),
    [
        (f"base_model.model.{Q0}.lora_A.weight", LoraTensor(Q0, "A", False, "weight")),
        (f"{Q0}.lora_B.weight", LoraTensor(Q0, "B", False, "weight")),
        (f"base_model.model.{Q0}.lora_A.default.weight", LoraTensor(Q0, "A", False, "weight")),
        (f"base_model.model.{Q0}.lora_B.bias", LoraTensor(Q0, "B", False, "bias")),
        ("base_model.model.model.embed_tokens.lora_embedding_A", LoraTensor("model.embed_tokens", "A", True, "")),
        ("base_model.model.model.embed_tokens.lora_embedding_B", LoraTensor("model.embed_tokens", "B", True, "")),
        ("prompt_embeddings", None),
        (f"base_model.model.{Q0}.lora_magnitude_vector", None),
        ("base_model.model.lm_head.modules_to_save.default.weight", None),
        ("lora_A.weight", None),
        (f"{Q0}.lora_A", None),
    ],
)
def test_tensor_names(name: str, want: LoraTensor | None) -> None:
    assert parse_tensor_name(name) == want


def test_pairs_and_their_refusals() -> None:
    a, b = torch.zeros(2, 4), torch.zeros(3, 2)
    pairs = lora_pairs({f"base_model.model.{Q0}.lora_A.weight": a, f"base_model.model.{Q0}.lora_B.weight": b})
    assert list(pairs) == [Q0] and pairs[Q0][0] is a and pairs[Q0][1] is b
    with pytest.raises(AdapterError, match="lack lora_B; a LoRA layer needs both A and B"):
        lora_pairs({f"{Q0}.lora_A.weight": a})
    with pytest.raises(
        AdapterError,
        match=r"LoRA on embedding layers is not served .* adapts model\.embed_tokens\); only linear layers are",
    ):
        lora_pairs({f"{Q0}.lora_A.weight": a, "base_model.model.model.embed_tokens.lora_embedding_A": a})
    with pytest.raises(AdapterError, match="unexpected tensor 'prompt_embeddings'"):
        lora_pairs({"prompt_embeddings": a})
    with pytest.raises(AdapterError, match=r"unexpected tensor '.*lora_B.bias'"):
        lora_pairs({f"{Q0}.lora_A.weight": a, f"{Q0}.lora_B.weight": b, f"{Q0}.lora_B.bias": torch.zeros(3)})
    with pytest.raises(AdapterError, match="holds no LoRA weights"):
        lora_pairs({})
    names = [f"{Q0}.lora_A.weight", "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight", "prompt_embeddings"]
    assert tensor_modules(names) == {Q0, "model.layers.1.mlp.up_proj"}
    assert short_names(tensor_modules(names)) == ["q_proj", "up_proj"]


def _peft_layers(config: dict[str, Any]) -> dict[str, Any]:
    """{module path: PEFT's LoRA layer} after PEFT injects `config` into a 3-layer Llama on the meta device."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    with torch.device("meta"):
        model = inject_adapter_in_model(LoraConfig(**config), LlamaForCausalLM(arch))
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "plain": {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]},
    "defaults": {"target_modules": ["q_proj"]},
    "rslora": {"r": 16, "lora_alpha": 8, "target_modules": ALL, "use_rslora": True},
    "patterns": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ALL,
        "rank_pattern": {"down_proj": 4, "layers.1.self_attn.q_proj": 2},
        "alpha_pattern": {"v_proj": 64},
    },
    "rslora-patterns": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ALL,
        "use_rslora": True,
        "rank_pattern": {"up_proj": 16},
        "alpha_pattern": {"up_proj": 2},
    },
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=list(CONFIGS))
def test_rank_and_scale_are_pefts(config: dict[str, Any]) -> None:
    layers = _peft_layers(config)
    assert layers
    for module, layer in layers.items():
        rank = int(layer.r["default"])
        assert lora_rank(config, module) == rank, module
        assert math.isclose(lora_scale(config, module, rank), float(layer.scaling["default"]), rel_tol=1e-12), module


TARGETS = {
    "names": {"target_modules": ["q_proj", "v_proj"]},
    "full-paths": {"target_modules": ["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.up_proj"]},
    "regex": {"target_modules": r".*\.layers\.[02]\.mlp\.(up|down)_proj"},
    "layers": {"target_modules": ["q_proj", "o_proj"], "layers_to_transform": [1]},
    "excluded": {"target_modules": ALL, "exclude_modules": ["k_proj", "gate_proj"]},
}


@pytest.mark.parametrize("config", TARGETS.values(), ids=list(TARGETS))
def test_targeted_modules_are_the_ones_peft_adapts(config: dict[str, Any]) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    with torch.device("meta"):
        names = [n for n, _ in LlamaForCausalLM(arch).named_modules()]
    assert targeted_modules(config, names) == set(_peft_layers(config))


def test_targets_in_messages_and_bad_configs() -> None:
    assert describe_targets({"target_modules": ["v_proj", "q_proj"]}) == "['q_proj', 'v_proj']"
    assert describe_targets({"target_modules": r".*\.q_proj"}) == repr(r".*\.q_proj")
    with pytest.raises(AdapterError, match="not a valid regular expression"):
        targeted_modules({"target_modules": "(unclosed"}, [Q0])
    with pytest.raises(AdapterError, match="not a LoRA config PEFT accepts"):
        targeted_modules({"target_modules": ["q_proj"], "layers_pattern": "layers"}, [Q0])

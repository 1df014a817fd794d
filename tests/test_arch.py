"""Architecture defaults: targets and kind come from the base's model_type; unknown bases get a usable error."""

from __future__ import annotations

import pytest

from loraswap.adapters.arch import UnknownArchitectureError, architecture, kind_of


@pytest.mark.parametrize(
    ("model_type", "kind", "targets"),
    [
        ("llama", "causal", ("q_proj", "v_proj")),
        ("qwen2", "causal", ("q_proj", "v_proj")),
        ("gemma", "causal", ("q_proj", "v_proj")),
        ("phi", "causal", ("q_proj", "v_proj")),
        ("phi3", "causal", ("qkv_proj",)),
        ("t5", "seq2seq", ("q", "v")),
    ],
)
def test_known_architectures(model_type: str, kind: str, targets: tuple[str, ...]) -> None:
    arch = architecture(model_type)
    assert (arch.kind, arch.targets) == (kind, targets)
    assert arch.peft_task == ("SEQ_2_SEQ_LM" if kind == "seq2seq" else "CAUSAL_LM")


def test_unknown_architecture_names_it_and_the_way_out() -> None:
    with pytest.raises(UnknownArchitectureError, match=r"'gpt2'.*--target-modules"):
        architecture("gpt2")
    by_hand = architecture("gpt2", ("c_attn",))
    assert (by_hand.kind, by_hand.targets) == ("causal", ("c_attn",))
    assert architecture("bart", ("q_proj", "v_proj")).kind == "seq2seq"
    assert architecture("llama", ("all-linear",)).targets == ("all-linear",)


def test_not_a_text_generation_base() -> None:
    with pytest.raises(UnknownArchitectureError, match="'vit'"):
        kind_of("vit")

"""What loraswap needs to know about a base's architecture, looked up by its `model_type`.

Nothing else in the code names Llama modules: the LoRA target modules, whether the base is a decoder
(causal LM) or an encoder-decoder (seq2seq, T5), and how its chat template treats a system prompt all
come from here. A base of an architecture not listed gets a clear error naming it; passing
`--target-modules` by hand makes any causal or seq2seq base usable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["causal", "seq2seq"]


class UnknownArchitectureError(ValueError):
    """loraswap has no defaults for this architecture; the message says how to go on."""


@dataclass(frozen=True)
class Architecture:
    model_type: str
    kind: Kind
    """causal: decoder-only, loaded with AutoModelForCausalLM; seq2seq: encoder-decoder (T5), AutoModelForSeq2SeqLM."""
    targets: tuple[str, ...]
    """Default LoRA target modules: the attention query and value projections (the LoRA paper's choice)."""
    system_role: bool = True
    """Whether the chat template accepts a system turn (Gemma's refuses one: the system text joins the user turn)."""

    @property
    def peft_task(self) -> str:
        """PEFT's `TaskType` value for this kind of base."""
        return "SEQ_2_SEQ_LM" if self.kind == "seq2seq" else "CAUSAL_LM"


_QV = ("q_proj", "v_proj")
ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", "causal", _QV),  # Llama 2/3, TinyLlama, SmolLM, SmolLM2
        Architecture("mistral", "causal", _QV),
        Architecture("qwen2", "causal", _QV),  # Qwen2, Qwen2.5
        Architecture("qwen3", "causal", _QV),
        Architecture("gemma", "causal", _QV, system_role=False),
        Architecture("gemma2", "causal", _QV, system_role=False),
        Architecture("phi", "causal", _QV),  # Phi-1.5, Phi-2
        Architecture("phi3", "causal", ("qkv_proj",)),  # Phi-3 fuses q, k and v into one projection
        Architecture("t5", "seq2seq", ("q", "v")),  # T5, Flan-T5
        Architecture("mt5", "seq2seq", ("q", "v")),
    )
}


def kind_of(model_type: str) -> Kind:
    """causal or seq2seq, from transformers' own auto-class tables (so it holds for bases not listed above)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type].kind
    # Encoder-decoders such as BART are in both tables (their decoder alone is a causal LM): seq2seq first.
    if model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "seq2seq"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise UnknownArchitectureError(
        f"base architecture {model_type!r} is neither a causal LM nor a seq2seq LM that transformers knows; "
        "loraswap serves text-generation bases only"
    )


def architecture(model_type: str, targets: tuple[str, ...] | None = None) -> Architecture:
    """The architecture's defaults; `targets` (from `--target-modules`) overrides the LoRA targets and is
    required for an architecture loraswap has no defaults for."""
    known = ARCHITECTURES.get(model_type)
    if known is not None:
        return known if not targets else Architecture(model_type, known.kind, targets, known.system_role)
    if not targets:
        raise UnknownArchitectureError(
            f"loraswap has no default LoRA target modules for base architecture {model_type!r} (it knows "
            f"{', '.join(sorted(ARCHITECTURES))}); pass them by hand, e.g. --target-modules q_proj,v_proj "
            "or --target-modules all-linear, naming the base's attention projection modules"
        )
    return Architecture(model_type, kind_of(model_type), targets)

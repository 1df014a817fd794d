"""PEFT's LoRA format, read in one place: tensor names, the modules a config targets, each module's rank and scale.

A PEFT LoRA adapter stores, for every adapted module of the base, two tensors named

    base_model.model.<module>.lora_A.weight   (r, in)
    base_model.model.<module>.lora_B.weight   (out, r)

(sometimes with the adapter's name before `weight`, `lora_A.default.weight`; LoRA on an embedding layer is
`lora_embedding_A` / `lora_embedding_B`). PEFT adds `scale * B(A(x))` to the module's output, with

    scale = alpha / r          (alpha/sqrt(r) with rsLoRA, `use_rslora`)

where r and alpha are the config's `r` and `lora_alpha`, or the module's entries of `rank_pattern` and
`alpha_pattern`. Validation, the GGUF export and the server's batched slots all read adapters through
`parse_tensor_name`, `lora_pairs`, `lora_rank` and `lora_scale`, so they agree on what an adapter holds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from loraswap.adapters.manifest import AdapterError

PEFT_PREFIX = "base_model.model."
"""What PEFT puts before a base module's path in a saved adapter's tensor names."""
_PARTS: dict[str, tuple[Literal["A", "B"], bool]] = {
    "lora_A": ("A", False),
    "lora_B": ("B", False),
    "lora_embedding_A": ("A", True),
    "lora_embedding_B": ("B", True),
}
DEFAULT_RANK = 8
DEFAULT_ALPHA = 8
"""PEFT's `LoraConfig` defaults for `r` and `lora_alpha`, which apply where a config leaves them out."""

T = TypeVar("T")


@dataclass(frozen=True)
class LoraTensor:
    """What a PEFT LoRA tensor's name says."""

    module: str
    """The base module it adapts: 'model.layers.0.self_attn.q_proj'."""
    part: Literal["A", "B"]
    embedding: bool
    """LoRA on an embedding layer (`lora_embedding_A/B`), not on a linear one."""
    leaf: str
    """The parameter: 'weight', 'bias' (a LoRA bias term), or '' (embedding LoRA tensors have none)."""

    @property
    def is_linear_weight(self) -> bool:
        """A linear layer's A or B matrix: what the served and exported LoRA computation uses."""
        return not self.embedding and self.leaf == "weight"


def parse_tensor_name(name: str) -> LoraTensor | None:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> LoraTensor('model.layers.0.self_attn.q_proj',
    'A', embedding=False, leaf='weight'); None for a tensor that is not LoRA's (`prompt_embeddings`, a saved
    module copy)."""
    parts = name.split(".")
    at = next((i for i, p in enumerate(parts) if p in _PARTS and i > 0), None)
    if at is None:
        return None
    part, embedding = _PARTS[parts[at]]
    rest = parts[at + 1 :]  # linear: [adapter name,] parameter name; embedding: [adapter name]
    if len(rest) > (1 if embedding else 2) or (not embedding and not rest):
        return None
    module = ".".join(parts[:at]).removeprefix(PEFT_PREFIX)
    return LoraTensor(module, part, embedding, "" if embedding else rest[-1])


def tensor_modules(names: Iterable[str]) -> set[str]:
    """The base modules that LoRA tensors of these names adapt (linear and embedding layers)."""
    return {t.module for t in map(parse_tensor_name, names) if t is not None}


def lora_pairs(tensors: Mapping[str, T]) -> dict[str, tuple[T, T]]:
    """{module: (A [r, in], B [out, r])} of a PEFT LoRA adapter's tensors, in the file's order. Anything else is
    refused with the reason: a tensor that is not a linear layer's LoRA matrix, LoRA on an embedding layer, a
    module with only one of A and B, no LoRA weights at all."""
    parsed = {name: parse_tensor_name(name) for name in tensors}
    for name, t in parsed.items():
        if t is not None and t.embedding:
            raise AdapterError(
                f"LoRA on embedding layers is not served or exported (tensor {name!r} adapts {t.module}); only "
                "linear layers are"
            )
    found: dict[str, dict[str, T]] = {}
    for name, tensor in tensors.items():
        t = parsed[name]
        if t is None or not t.is_linear_weight:
            raise AdapterError(
                f"unexpected tensor {name!r} in a LoRA adapter: PEFT names a linear layer's LoRA weights "
                "'<module>.lora_A.weight' and '<module>.lora_B.weight'"
            )
        found.setdefault(t.module, {})[t.part] = tensor
    pairs = {}
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(
                f"LoRA weights of {module} lack lora_{'A' if 'A' not in ab else 'B'}; a LoRA layer needs both A and B"
            )
        pairs[module] = (ab["A"], ab["B"])
    if not pairs:
        raise AdapterError("the adapter holds no LoRA weights")
    return pairs


def _pattern_value(pattern: Any, module: str) -> Any:
    """The entry of PEFT's `rank_pattern` / `alpha_pattern` that applies to `module` (PEFT's own matching), or None."""
    if not pattern:
        return None
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(pattern), module)
    return pattern.get(key)


def lora_rank(config: Mapping[str, Any], module: str) -> Any:
    """The rank r that `config` (an adapter_config.json) gives `module`: its `rank_pattern` entry, else `r`. Returned
    as written (validation checks it is an int in range)."""
    found = _pattern_value(config.get("rank_pattern"), module)
    return found if found is not None else config.get("r", DEFAULT_RANK)


def lora_alpha(config: Mapping[str, Any], module: str) -> Any:
    """The alpha that `config` gives `module`: its `alpha_pattern` entry, else `lora_alpha`."""
    found = _pattern_value(config.get("alpha_pattern"), module)
    return found if found is not None else config.get("lora_alpha", DEFAULT_ALPHA)


def lora_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """The factor PEFT multiplies `module`'s B(A(x)) by: alpha / r, or alpha / sqrt(r) with rsLoRA. `rank` is the
    rank of the module's weights (equal to `lora_rank` for an adapter that passed validation)."""
    alpha = float(lora_alpha(config, module))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _peft_lora_config(config: Mapping[str, Any]) -> Any:
    from peft import LoraConfig

    fields = set(LoraConfig.__dataclass_fields__)
    try:
        return LoraConfig(**{k: v for k, v in config.items() if k in fields and k != "peft_type"})
    except (TypeError, ValueError) as e:
        raise AdapterError(f"adapter_config.json is not a LoRA config PEFT accepts: {e}") from None


def targeted_modules(config: Mapping[str, Any], modules: Iterable[str]) -> set[str]:
    """Which of `modules` (module paths of a base) `config` puts LoRA on, by PEFT's own matching rule: a list of
    names matches a module path equal to a name or ending in '.name', a string is a regular expression the whole
    path must match; `layers_to_transform`, `layers_pattern` and `exclude_modules` narrow that."""
    from peft.tuners.tuners_utils import check_target_module_exists

    peft_config = _peft_lora_config(config)
    try:
        return {m for m in modules if m and check_target_module_exists(peft_config, m)}
    except re.error as e:
        raise AdapterError(
            f"adapter_config.json: target_modules {config.get('target_modules')!r} is not a valid "
            f"regular expression: {e}"
        ) from None


def describe_targets(config: Mapping[str, Any]) -> str:
    """The config's `target_modules` as a message names them: a sorted list, or the regular expression."""
    targets = config.get("target_modules")
    if isinstance(targets, list | tuple | set):
        return repr(sorted(str(t) for t in targets))
    return repr(targets)


def short_names(modules: Iterable[str]) -> list[str]:
    """['model.layers.0.self_attn.q_proj', 'model.layers.1.self_attn.q_proj'] -> ['q_proj']."""
    return sorted({m.rsplit(".", 1)[-1] for m in modules})

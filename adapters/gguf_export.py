"""A LoRA adapter in llama.cpp's GGUF adapter format, and the Ollama Modelfile that runs it.

llama.cpp reads a LoRA adapter as a GGUF file with `general.type = adapter`, `adapter.type = lora`
and `adapter.lora.alpha`, holding for each adapted base tensor `<base tensor>.lora_a` and
`<base tensor>.lora_b`. In GGUF's dimension order (fastest first) a base weight is `[in, out]`,
`lora_a` is `[in, r]` and `lora_b` is `[r, out]`: PEFT's `lora_A.weight` `(r, in)` and
`lora_B.weight` `(out, r)` as row-major arrays, untransposed. llama.cpp adds
`(alpha / r) * B(A(x))` to the base layer's output, `r` being the rank of that tensor pair.

The Llama family is stored in GGUF with the rows of `q_proj` and `k_proj` reordered (llama.cpp's
RoPE rotates interleaved pairs, Hugging Face's rotates halves), so the output rows of those
adapters, that is `lora_b`'s rows, get the same reordering. Tensor names come from the `gguf`
package's own maps (`TensorNameMap`), the ones llama.cpp's converters use.
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loraswap.adapters.lora import lora_pairs, lora_rank, lora_scale
from loraswap.adapters.manifest import AdapterError
from loraswap.adapters.prompt import SYSTEM_PROMPT, chat_messages, end_of_turn_id, render_prompt, stop_token_ids

# transformers model_type -> (GGUF architecture name, whether llama.cpp's converter reorders q/k rows).
# Mistral is converted as a Llama by llama.cpp; Qwen2 keeps Hugging Face's row order.
GGUF_ARCHS: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
}
# The decoder-block linear layers llama.cpp applies LoRA to (others, such as embeddings, are refused).
_LINEAR_TENSORS = ("ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT", "FFN_GATE", "FFN_UP", "FFN_DOWN")


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: PEFT's tensors and the scale PEFT applies (alpha/r, rsLoRA, patterns)."""

    module: str
    a: Any  # torch tensor (r, in)
    b: Any  # torch tensor (out, r)
    scale: float


def gguf_arch(model_type: str) -> tuple[str, bool]:
    if model_type not in GGUF_ARCHS:
        raise AdapterError(
            f"GGUF export supports bases of type {', '.join(GGUF_ARCHS)}; this base is {model_type!r}, whose "
            "llama.cpp tensor names and layouts loraswap does not map (export --format merged instead)"
        )
    return GGUF_ARCHS[model_type]


def lora_modules(weights: dict[str, Any], peft_config: dict[str, Any]) -> list[LoraModule]:
    """PEFT's `...<module>.lora_A.weight` / `lora_B.weight` tensors paired, with each module's scale by PEFT's rule
    (`lora_scale`: alpha or its `alpha_pattern` entry, over r or sqrt(r)), in layer order."""
    out = []
    for module, (a, b) in lora_pairs(weights).items():
        rank = lora_rank(peft_config, module)
        if a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(f"module {module}: LoRA weights of rank {a.shape[0]}, config says {rank}")
        out.append(LoraModule(module, a, b, lora_scale(peft_config, module, rank)))
    return sorted(out, key=lambda m: _layer_order(m.module))


def _not_adaptable(module: str) -> str:
    return (
        f"LoRA on {module}: GGUF adapters are exported for the attention and MLP projections of the decoder "
        f"blocks only ({', '.join(t.lower() for t in _LINEAR_TENSORS)}), not for this module"
    )


def _layer_order(module: str) -> tuple[int, str]:
    digits = [int(p) for p in module.split(".") if p.isdigit()]
    return (digits[0] if digits else -1, module)


def interleave_rope_rows(b: Any, n_heads: int) -> Any:
    """Reorder output rows from Hugging Face's rotate-half layout to llama.cpp's interleaved pairs.

    Per head, HF keeps the first and second halves of each rotated pair in two blocks of head_dim/2
    rows; llama.cpp keeps the two members of each pair in adjacent rows: row (head, half, i) moves
    to (head, i, half).
    """
    rows = b.shape[0]
    if rows % (2 * n_heads):
        raise AdapterError(f"{rows} output rows do not split into {n_heads} heads of rotary pairs")
    return b.reshape(n_heads, 2, rows // n_heads // 2, *b.shape[1:]).transpose(1, 2).reshape(b.shape)


def base_tensor_names(modules: Iterable[str], arch: dict[str, Any], model_type: str) -> dict[str, tuple[str, str]]:
    """{module path: (GGUF tensor kind, base tensor name)}, e.g. 'model.layers.0.self_attn.q_proj' ->
    ('ATTN_Q', 'blk.0.attn_q'), from gguf's own map; a module llama.cpp does not adapt is refused."""
    import gguf

    arch_name = gguf_arch(model_type)[0]
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    names = gguf.get_tensor_name_map(model_arch, int(arch["num_hidden_layers"]))
    out = {}
    for module in modules:
        found = names.get_type_and_name(module)
        if found is None or found[0].name not in _LINEAR_TENSORS:
            raise AdapterError(_not_adaptable(module))
        out[module] = (found[0].name, found[1])
    return out


def gguf_tensors(
    modules: list[LoraModule], arch: dict[str, Any], model_type: str, progress: bool = True
) -> tuple[list[tuple[str, np.ndarray]], float]:
    """(GGUF tensors in writing order, adapter alpha) for the adapted modules of a base.

    llama.cpp scales every tensor pair by `alpha / r`. Alpha is the one most modules need (`lora_alpha`
    for plain LoRA, `lora_alpha * sqrt(r)` for rsLoRA); a module whose PEFT scale differs (alpha or
    rank patterns) has the ratio folded into its `lora_b`, which is exact.
    """
    import torch
    from tqdm.auto import tqdm

    if not modules:
        raise AdapterError("the adapter holds no LoRA weights")
    permute = gguf_arch(model_type)[1]
    names = base_tensor_names([m.module for m in modules], arch, model_type)
    n_heads = int(arch["num_attention_heads"])
    n_kv_heads = int(arch.get("num_key_value_heads") or n_heads)
    alpha = Counter(m.scale * m.a.shape[0] for m in modules).most_common(1)[0][0]
    out: list[tuple[str, np.ndarray]] = []
    for m in tqdm(modules, desc="converting to GGUF", unit="layer", disable=not progress, leave=False):
        kind, base = names[m.module]
        a = m.a.to(torch.float32)
        b = m.b.to(torch.float32)
        fold = m.scale * a.shape[0] / alpha
        if not math.isclose(fold, 1.0, rel_tol=1e-7):
            b = b * fold
        if permute and kind in ("ATTN_Q", "ATTN_K"):
            b = interleave_rope_rows(b, n_heads if kind == "ATTN_Q" else n_kv_heads)
        out.append((f"{base}.weight.lora_a", a.contiguous().numpy()))
        out.append((f"{base}.weight.lora_b", b.contiguous().numpy()))
    return out, float(alpha)


def write_gguf_adapter(
    path: Path,
    tensors: list[tuple[str, np.ndarray]],
    alpha: float,
    model_type: str,
    name: str,
    base_id: str,
    progress: bool = True,
) -> None:
    """Write the adapter GGUF atomically (a temporary file beside it, then a rename)."""
    import gguf

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, gguf_arch(model_type)[0])
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(name)
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_id)
        for tensor_name, data in tensors:
            writer.add_tensor(tensor_name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)


@functools.lru_cache(maxsize=8)
def _gguf_shape(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    """The architecture fields of a GGUF file, read once per file version (reading parses its whole vocabulary:
    tens of seconds for a 49k-token one, and an export of many adapters checks the same base each time)."""
    import gguf

    try:
        fields = gguf.GGUFReader(path).fields
    except (OSError, ValueError) as e:
        raise AdapterError(f"base GGUF {Path(path).name!r} cannot be read: {e}") from None
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
    keys = ["general.architecture"] + [
        f"{arch}.{k}" for k in ("block_count", "embedding_length", "attention.head_count")
    ]
    return {k: fields[k].contents() if k in fields else None for k in keys}


def check_base_gguf(path: Path, arch: dict[str, Any], model_type: str) -> None:
    """Refuse a base GGUF whose architecture is not the adapter's base (layers, width, heads)."""
    try:
        stat = path.stat()
    except OSError as e:
        raise AdapterError(f"base GGUF {path.name!r} cannot be read: {e}") from None
    fields = _gguf_shape(str(path), stat.st_size, stat.st_mtime_ns)
    arch_name = fields["general.architecture"]
    want = {
        "general.architecture": gguf_arch(model_type)[0],
        f"{arch_name}.block_count": arch.get("num_hidden_layers"),
        f"{arch_name}.embedding_length": arch.get("hidden_size"),
        f"{arch_name}.attention.head_count": arch.get("num_attention_heads"),
    }
    wrong = [f"{k} is {fields.get(k)!r}, the adapter's base has {v!r}" for k, v in want.items() if fields.get(k) != v]
    if wrong:
        raise AdapterError(f"base GGUF {path.name!r} is not the adapter's base: {'; '.join(wrong)}")


_SYSTEM_MARK = "LORASWAPSYSTEMMARK"
_PROMPT_MARK = "LORASWAPPROMPTMARK"
_RESPONSE_MARK = "LORASWAPRESPONSEMARK"


def ollama_template(tokenizer: Any) -> str:
    """loraswap's prompt format as an Ollama (Go) template over `.System`, `.Prompt` and `.Response`.

    The base's chat template is rendered with marker strings in place of the system prompt, the
    question and the answer, and the markers become template variables; so Ollama builds the very
    text `render_prompt` builds, and in a conversation each earlier answer ends as in training.
    """
    prompt = render_prompt(tokenizer, _PROMPT_MARK, system=_SYSTEM_MARK)
    if prompt.count(_SYSTEM_MARK) != 1 or prompt.count(_PROMPT_MARK) != 1:
        raise AdapterError("the base's prompt format does not place the system prompt and question once each")
    suffix = ""
    if getattr(tokenizer, "chat_template", None):
        messages = [
            *chat_messages(tokenizer, _SYSTEM_MARK, _PROMPT_MARK),
            {"role": "assistant", "content": _RESPONSE_MARK},
        ]
        full = str(tokenizer.apply_chat_template(messages, tokenize=False))
        head, _, tail = full.partition(_RESPONSE_MARK)
        if head == prompt:
            suffix = tail
    else:
        suffix = tokenizer.decode([end_of_turn_id(tokenizer)])
    text = (prompt + _RESPONSE_MARK + suffix).replace("{{", '{{ "{{" }}')
    for mark, var in ((_SYSTEM_MARK, ".System"), (_PROMPT_MARK, ".Prompt"), (_RESPONSE_MARK, ".Response")):
        text = text.replace(mark, "{{ " + var + " }}")
    return text


def stop_strings(tokenizer: Any) -> list[str]:
    return [str(tokenizer.convert_ids_to_tokens(i)) for i in stop_token_ids(tokenizer)]


def modelfile(name: str, base_from: str, adapter_file: str, tokenizer: Any) -> str:
    """An Ollama Modelfile: the base GGUF, the adapter, loraswap's prompt format, greedy decoding."""
    template = ollama_template(tokenizer)
    if '"""' in template or '"""' in SYSTEM_PROMPT:
        raise AdapterError('the prompt format contains """, which a Modelfile cannot quote')
    lines = [
        f"# Ollama: ollama create {name} -f Modelfile && ollama run {name}",
        f"FROM {base_from}",
        f"ADAPTER ./{adapter_file}",
        f'TEMPLATE """{template}"""',
        f'SYSTEM """{SYSTEM_PROMPT}"""',
        *(f'PARAMETER stop "{s}"' for s in stop_strings(tokenizer)),
        "# loraswap answers greedily by default",
        "PARAMETER temperature 0",
    ]
    return "\n".join(lines) + "\n"

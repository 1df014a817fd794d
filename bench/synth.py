"""Synthetic LoRA adapters for load: the shape of a real one, random non-zero weights.

A benchmark over 64 adapters needs 64 adapters; training them would take hours and tell nothing more
about serving speed than random weights of the same shapes do. They are written in PEFT's format
(`LoraConfig.save_pretrained` + a safetensors file with PEFT's tensor names), so the server loads
them exactly as it loads trained ones.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from loraswap.adapters.base import BaseRef
from loraswap.adapters.manifest import CONFIG_FILE, WEIGHTS_FILE

TARGETS = ("q_proj", "v_proj")


def synth_lora(ref: BaseRef, out: Path, seed: int, rank: int = 8, alpha: int = 32) -> Path:
    """Write a rank-`rank` LoRA on q_proj and v_proj of every layer of `ref` into `out` (a folder)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    from loraswap.adapters.validate import linear_shapes

    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module, (fan_in, fan_out) in linear_shapes(ref.load_path).items():
        if module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        # A as PEFT initialises it, B small but non-zero, so every adapter changes the model's output.
        a = (torch.rand(rank, fan_in, generator=gen) * 2 - 1) / fan_in**0.5
        b = torch.randn(fan_out, rank, generator=gen) * 0.02
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    if not tensors:
        raise ValueError(f"base {ref.base_id!r} has no {' or '.join(TARGETS)} layers to adapt")
    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(TARGETS), task_type="CAUSAL_LM", base_model_name_or_path=None
    ).save_pretrained(str(out))
    save_file(tensors, str(out / WEIGHTS_FILE))
    return out


def archive(folder: Path) -> bytes:
    """The adapter in `folder` as a .tar.gz, the upload format of POST /v1/adapters."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            tar.add(folder / name, arcname=name)
    return buf.getvalue()

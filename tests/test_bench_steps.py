"""`python -m loraswap.bench.steps`: the engine's steps timed in one process (a developer's tool, kept working)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loraswap.server.worker import q4


@pytest.mark.skipif(q4.lora_kernel() is None, reason="no LoRA kernel (a CPU without AVX512F, or no C compiler)")
def test_steps_compares_the_lora_kernel_with_torch(tiny_base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loraswap.bench import steps

    args = ["--base", str(tiny_base), "--quant", "none", "--batch", "2", "--adapters", "2", "--tokens", "3"]
    steps.main([*args, "--lora-kernel-ab", "2"])
    out = capsys.readouterr().out
    assert re.search(r"2 rounds each: decoding step [\d.]+ ms with the LoRA kernel, [\d.]+ ms in torch", out), out


@pytest.mark.skipif(
    not q4.vnni_cpu() or q4.library() is None, reason="no int8 4-bit kernel (no AVX512-VNNI or no C compiler)"
)
def test_steps_compares_two_4bit_kernels(lively_base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loraswap.bench import steps

    args = ["--base", str(lively_base), "--quant", "nf4", "--batch", "2", "--adapters", "2", "--tokens", "3"]
    steps.main([*args, "--q4-kernel-ab", "float32,int8", "--ab-rounds", "2"])
    out = capsys.readouterr().out
    assert "call loraswap's" in out  # the fast paths were put on first
    pattern = r"2 rounds each: prefill \d+ ms on float32, \d+ on int8 \(float32/int8 [\d.]+\); decoding step"
    assert re.search(pattern, out), out
    with pytest.raises(SystemExit, match="two of"):
        steps.main([*args, "--q4-kernel-ab", "float32,fast"])

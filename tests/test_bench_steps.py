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

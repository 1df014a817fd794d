"""`python -m loraswap.bench.q4_kernels`: a shipped adapter's held-out answer NLL on two 4-bit kernels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraswap.server.worker import fastpath, q4


@pytest.mark.skipif(
    not fastpath.native_bf16_cpu() or not q4.vnni_cpu() or q4.library() is None,
    reason="the int8 kernel needs AVX512-BF16 packing, AVX512-VNNI and a C compiler",
)
def test_the_kernels_scores_are_close_and_each_against_the_first(
    medquad: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loraswap.bench import q4_kernels

    argv = ["--data", str(medquad), "--adapters", "symptoms", "--questions", "2", "--kernels", "float32,int8"]
    q4_kernels.main([*argv, "--out", str(tmp_path)])
    (result,) = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "q4_kernels.json").read_text()) == [result]
    assert result["adapter"] == "symptoms" and result["questions"] == 2
    first, int8 = result["kernels"]["float32"], result["kernels"]["int8"]
    assert "adapter_vs_float32" not in first
    assert first["adapter_vs_base"] < -0.25 and int8["adapter_vs_base"] < -0.25  # the adapter's gain survives
    for who in ("adapter", "base"):
        change = (int8[f"{who}_nll"] - first[f"{who}_nll"]) / first[f"{who}_nll"]
        assert int8[f"{who}_vs_float32"] == pytest.approx(change, abs=2e-4)
        assert abs(change) < 0.05  # rounding the inputs to 8 bits moves the score a little, not a lot
        low, high = int8[f"{who}_vs_float32_ci95"]
        assert low <= int8[f"{who}_vs_float32"] <= high
    with pytest.raises(SystemExit, match="--kernels takes"):
        q4_kernels.main([*argv[:-1], "fast"])

"""loraswap's CPU kernels (`server/worker/q4.py`, `server/worker/kernels/q4_cpu.c`): each 4-bit kernel computes
what the layer's 4-bit weight means (checked against a dequantization written here from bitsandbytes' storage
format, not from the kernels' packed layout), at every row count around the 8-row tiles, and the LM head's kernel
what its bf16 weight means; they are built once and cached; without a compiler, or where the build fails, the
layers keep bitsandbytes' kernel."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loraswap.adapters.base import load_base
from loraswap.server.worker import fastpath, q4

pytestmark = pytest.mark.skipif(
    not fastpath.native_bf16_cpu(), reason="the kernels work on bitsandbytes' packing for CPUs with AVX512-BF16"
)


@pytest.fixture(autouse=True)
def fresh_library() -> Iterator[None]:
    q4.library.cache_clear()
    yield
    q4.library.cache_clear()  # tests that break the build leave no failed library behind


def layer(
    n: int, k: int, quant: str, blocksize: int, bias: bool, seed: int = 0
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A bitsandbytes Linear4bit [n, k] with random weights, packed for its CPU kernel; and, from its storage
    format before packing, each weight's code index and scale (the block's absmax rounded to bf16, as the
    packing stores it): a byte holds element 2i in its high nibble and 2i+1 in its low one, element i is
    scaled by absmax[i // blocksize]."""
    from bitsandbytes.nn import Linear4bit, Params4bit

    torch.manual_seed(seed)
    module = Linear4bit(k, n, bias=bias, compute_dtype=torch.float32, compress_statistics=False, quant_type=quant)
    module.weight = Params4bit(
        torch.randn(n, k), requires_grad=False, quant_type=quant, blocksize=blocksize, compress_statistics=False
    )
    if bias:
        module.bias = torch.nn.Parameter(torch.randn(n), requires_grad=False)
    module = module.to("cpu").eval()  # quantizes
    state = module.weight.quant_state
    data = module.weight.data.reshape(-1)
    nibbles = torch.stack([data >> 4, data & 15], dim=1).reshape(n, k).long()
    scales = state.absmax.to(torch.bfloat16).double().repeat_interleave(blocksize).reshape(n, k)
    with torch.inference_mode():
        module(torch.zeros(1, k))  # bitsandbytes packs the weight for its CPU kernel here
    assert q4.packed_state(module) is not None
    return module, nibbles, scales


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_each_kernel_computes_what_the_4bit_weight_means(quant: str, blocksize: int) -> None:
    n, k = 96, 256  # three packed blocks of 32 outputs, two or four blocks of inputs
    module, nibbles, scales = layer(n, k, quant, blocksize, bias=True)
    code = module.weight.quant_state.code
    weights = {  # the bf16 kernel takes the input and the 16 code values in bf16 (vdpbf16ps); sums in float32
        "float32": code.double()[nibbles] * scales,
        "bfloat16": code.to(torch.bfloat16).double()[nibbles] * scales,
    }
    inputs = {"float32": lambda x: x.double(), "bfloat16": lambda x: x.to(torch.bfloat16).double()}
    bias = module.bias.detach().double()
    for variant in q4.VARIANTS:
        forward = q4.kernel(module, variant)
        assert forward is not None, variant
        for rows in (1, 3, 7, 8, 9, 16, 17, 33):  # around the kernels' 8-row tiles
            x = torch.randn(rows, k)
            x[0, :blocksize] = 0.0  # a block of zeros: scale 0
            with torch.inference_mode():
                got = forward(x)
            if variant == "int8":
                want = int8_reference(x, code, nibbles, scales, blocksize) + bias
            else:
                want = inputs[variant](x) @ weights[variant].T + bias
            assert got.dtype == torch.float32 and got.shape == (rows, n)
            scale = (x.double().abs() @ weights["float32"].abs().T).max()  # the size of the sums' terms
            assert (got.double() - want).abs().max() <= 1e-5 * scale, (variant, rows)


def int8_reference(
    x: torch.Tensor, code: torch.Tensor, nibbles: torch.Tensor, scales: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """What the int8 variant computes, from the 4-bit storage format: each row's block of inputs as int8 in units
    of its absmax / 127 (float32, rounded to nearest even), each code as round(code * 127 / max|code|)."""
    rows, k = x.shape
    blocks = x.reshape(rows, k // blocksize, blocksize)
    amax = blocks.abs().amax(dim=2, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    q = torch.round(blocks * inv).double().reshape(rows, k)
    unit = (amax / torch.tensor(127.0)).double().repeat_interleave(blocksize, dim=2).reshape(rows, k)
    cmax = code.float().abs().max()
    levels = torch.round(code.float() * (torch.tensor(127.0) / cmax)).double() * (cmax.double() / 127)
    return (q * unit) @ (levels[nibbles] * scales).T


def test_the_int8_variant_stays_close_to_the_exact_product() -> None:
    """The price of int8 inputs: on random rows, an output's error is well under 2% of the output's size."""
    module, nibbles, scales = layer(128, 512, "nf4", 64, bias=False, seed=2)
    forward = q4.kernel(module, "int8")
    assert forward is not None
    x = torch.randn(24, 512)
    exact = x.double() @ (module.weight.quant_state.code.double()[nibbles] * scales).T
    with torch.inference_mode():
        got = forward(x).double()
    assert ((got - exact).norm() / exact.norm()).item() < 0.02


def test_the_kernels_agree_with_bitsandbytes_own_on_a_3d_input_without_bias() -> None:
    module, _, _ = layer(64, 128, "nf4", 64, bias=False, seed=1)
    x = torch.randn(2, 5, 128)
    with torch.inference_mode():
        own = module(x)  # bitsandbytes' kernel: bf16 input, bf16 output
        for variant in q4.VARIANTS:
            forward = q4.kernel(module, variant)
            assert forward is not None
            got = forward(x)
            assert got.shape == own.shape == (2, 5, 64)
            torch.testing.assert_close(got, own, rtol=2e-2, atol=2e-2 * own.abs().max().item())


def test_the_kernels_take_only_layers_packed_for_them_and_shapes_the_layout_holds() -> None:
    module, _, _ = layer(64, 128, "nf4", 64, bias=False)
    state = module.weight.quant_state
    lib = q4.library()
    assert lib is not None
    a, out, code = torch.zeros(1, 128), torch.zeros(1, 64), state.code.float()

    def call(n: int, k: int, blocksize: int) -> int:
        return int(
            lib.q4_matmul_f32(
                ctypes.c_int64(1), ctypes.c_int64(n), ctypes.c_int64(k), ctypes.c_void_p(a.data_ptr()),
                ctypes.c_int64(k), ctypes.c_void_p(module.weight.data.data_ptr()),
                ctypes.c_void_p(state.absmax.data_ptr()), ctypes.c_int64(blocksize), ctypes.c_void_p(code.data_ptr()),
                ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(n), ctypes.c_int(1),
            )
        )  # fmt: skip

    assert call(64, 128, 64) == 0
    assert call(48, 128, 64) == -1  # outputs not in whole packed blocks of 32
    assert call(64, 96, 64) == -1  # inputs not in whole blocks of the scales
    assert call(64, 128, 63) == -1
    module.train()
    assert q4.kernel(module, "float32") is None
    fresh = type(module)(128, 64, bias=False, quant_type="nf4").to("cpu").eval()  # not packed before a forward
    assert q4.packed_state(fresh) is None and q4.kernel(fresh, "float32") is None


def test_the_bf16_weight_kernel_computes_rows_times_the_bf16_weight() -> None:
    torch.manual_seed(0)
    for n in (64, 100):  # 100: padded to whole blocks of 32, the padding cut off
        weight = torch.randn(n, 96)
        matmul = q4.bf16_weight_matmul(weight)
        assert matmul is not None
        exact = weight.to(torch.bfloat16).double()
        for rows in (1, 7, 8, 9, 17):
            x = torch.randn(rows, 96)
            got = matmul(x)
            assert got.shape == (rows, n) and got.dtype == torch.float32
            want = x.double() @ exact.T
            scale = (x.double().abs() @ exact.abs().T).max()
            assert (got.double() - want).abs().max() <= 1e-5 * scale, (n, rows)


def test_the_build_is_cached_per_source_and_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = q4.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert q4.build(tmp_path) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # nothing half-built left beside it
    monkeypatch.setenv("CC", f"{q4.compiler()[0]} -DLORASWAP_OTHER_FLAGS")
    assert q4.build(tmp_path) != first  # another compiler command: another build


@pytest.mark.parametrize(
    ("cc", "why"), [("loraswap-no-such-cc", "no C compiler"), ("cc -include loraswap-missing.h", "failed on q4_cpu.c")]
)
def test_without_a_working_compiler_the_layers_keep_bitsandbytes_kernel(
    cc: str,
    why: str,
    lively_base: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from bitsandbytes.nn import Linear4bit

    monkeypatch.setenv("LORASWAP_CACHE_DIR", str(tmp_path))  # no build cached there
    monkeypatch.setenv("CC", cc)
    base = load_base(str(lively_base), quant="nf4")
    layers = [m for m in base.model.modules() if isinstance(m, Linear4bit)]
    with caplog.at_level(logging.WARNING, logger="loraswap.server.worker.q4"):
        assert fastpath.lean_4bit(base.model, "float32") == (len(layers), "bitsandbytes")
        assert fastpath.lean_4bit(base.model, "auto")[1] == "bitsandbytes"
    assert why in caplog.text and "4-bit layers keep bitsandbytes' own" in caplog.text
    assert caplog.text.count("not available") == 1  # tried once
    assert all("forward" in m.__dict__ for m in layers)  # bitsandbytes' kernel, called directly


def test_auto_takes_the_kernel_measured_fastest(lively_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bitsandbytes.nn import Linear4bit

    for fastest in ("float32", "bfloat16", "int8", "bitsandbytes"):
        base = load_base(str(lively_base), quant="nf4")
        timed: list[tuple[str, ...]] = []

        def times(
            calls: dict[str, object], fastest: str = fastest, timed: list[tuple[str, ...]] = timed
        ) -> dict[str, float]:
            timed.append(tuple(calls))
            return {name: 1.0 if name == fastest else 2.0 for name in calls}

        monkeypatch.setattr(fastpath, "_median_times", times)
        done = fastpath.apply(base.model, "float32", rows=4)
        layers = [m for m in base.model.modules() if isinstance(m, Linear4bit)]
        assert timed == [("bitsandbytes", "float32", "bfloat16", "int8")]
        assert done["q4_kernel"] == fastest and done["lean_4bit_layers"] == len(layers)
        assert fastpath.KERNEL_NAMES[fastest] in fastpath.describe(done)

"""loraswap's own CPU kernels for bitsandbytes' 4-bit layers and the LM head (`kernels/q4_cpu.c`), built on
first use.

bitsandbytes' fused CPU kernel computes a 4-bit layer one input row at a time, dequantizing every weight again
for each row, so a 16-row decoding step costs about 6 times a 1-row one (1536 x 576: 40 us for one row,
250 us for 16, on a 2-core Xeon). These kernels dequantize each tile of weights once, into registers, for up
to 8 rows, on the weights bitsandbytes has already packed for its own CPU kernel (nothing is copied or
re-laid out). Three variants:

- `float32`: weights dequantized to float32, float32 FMAs, float32 input: 121 us for 16 rows of that layer
  on the same Xeon, where a bf16 dot product issues at half the rate of two float32 FMAs.
- `bfloat16`: bf16 dot products on the input rounded to bf16 (as bitsandbytes does), for CPUs where those
  are the faster (on the 2-core EPYC of earlier runs a bf16 matmul was 3x faster than float32; this variant
  has not been timed there).
- `int8`: the input quantized to int8 in blocks of the weight's block size (a scale each, as llama.cpp's Q8
  activations), the 4-bit codes as int8, integer dot products (AVX512-VNNI, 4 multiply-adds per 32-bit lane,
  against a float32 FMA's 1): on a 2-core AMD EPYC a 16-row decoding step 1.02-1.06x and a 16-prompt prefill
  1.07-1.18x faster than on the bf16 variant, 1.17-1.35x and 1.47-1.70x than on the float32 one (BENCHMARKS.md).
  Its rounding of the input is the price; what it does to the answers' scores: `python -m
  loraswap.bench.q4_kernels`.

For the LM head (dense), `bf16_weight_matmul`: a bf16 copy of the weight, float32 FMAs: it reads half the memory
of the float32 head without bf16 dot products (`fastpath.bf16_head` recomputes the top logits in float32).

For the LoRA layers (`slots.py`), `lora_kernel`: every row's low-rank delta added into the base layer's output in
one call, each row reading its own adapter's slot (no gathered copies), on any CPU with AVX512F. In torch the same
takes two or three small kernels a layer whose dispatch, not arithmetic, is the cost: about 3 ms of a 51 ms
16-row decoding step with q, v adapters on 30 layers.

The C source is compiled with the system's C compiler (`CC`, else `cc`; GCC 10 or later, or Clang 9 or later,
for the AVX512-BF16 intrinsics) into the user cache, once per source and compiler, and loaded with ctypes.
OpenMP threads come from the libgomp torch already loaded (one thread team, as bitsandbytes' own library).
Where there is no compiler, or the build fails, `library()` is None and the layers keep bitsandbytes' kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

Variant = Literal["float32", "bfloat16", "int8"]
VARIANTS: tuple[Variant, ...] = ("float32", "bfloat16", "int8")
SOURCE = Path(__file__).with_name("kernels") / "q4_cpu.c"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-mavx512vnni", "-fopenmp", "-fPIC", "-shared")
BLOCK_N = 32  # output features bitsandbytes packs together


def compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def build(out_dir: Path) -> Path:
    """Compile the kernels into `out_dir` (skipped when a build of this source with this compiler is there);
    the shared library's path. Raises on a missing compiler or a failed build."""
    cc = compiler()
    if not cc or shutil.which(cc[0]) is None:
        raise FileNotFoundError(f"no C compiler {cc[0] if cc else ''!r} (set CC)")
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([*cc, *FLAGS]).encode() + version.encode()).hexdigest()
    target = out_dir / f"q4_cpu-{key[:16]}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # built aside, then renamed: workers may race
        built = Path(tmp) / target.name
        done = subprocess.run([*cc, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cc)} failed on {SOURCE.name}:\n{done.stderr.strip()}")
        os.replace(built, target)
    return target


def cache_dir() -> Path:
    """Where builds are kept: `kernels` in the user cache (LORASWAP_CACHE_DIR, as the converted bases)."""
    from loraswap.adapters.base import default_cache_dir

    return default_cache_dir() / "kernels"


@cache
def library() -> ctypes.CDLL | None:
    """The built kernels, or None (logged once) where they cannot be built or loaded."""
    try:
        lib = ctypes.CDLL(str(build(cache_dir())))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("loraswap's CPU kernels are not available (4-bit layers keep bitsandbytes' own): %s", exc)
        return None
    for name in ("q4_matmul_f32", "q4_matmul_bf16", "q4_matmul_i8", "bf16w_matmul", "lora_add"):
        getattr(lib, name).restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.q4_matmul_i8.argtypes = [i64, i64, i64, ptr, i64, ptr, ptr, i64, ptr, ptr, i64, ctypes.c_int]
    return lib


def packed_state(module: Any) -> Any | None:
    """The quant state of a bitsandbytes Linear4bit whose weight is packed for the CPU kernels, or None."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False) or len(state.shape) != 2:
        return None
    n, k = int(state.shape[0]), int(state.shape[1])
    block = int(state.blocksize)
    if state.absmax.dtype != torch.bfloat16 or module.weight.dtype != torch.uint8:
        return None
    if n % BLOCK_N or block % 2 or k % block or tuple(state.absmax.shape) != (k // block, n):
        return None
    return state


def kernel(module: Any, variant: Variant) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A forward for `module` (a packed bitsandbytes Linear4bit) on the `variant` kernel, or None where the
    kernels or that layout are not there. (bitsandbytes packs a layer only on a CPU with AVX512-BF16, which
    these kernels need.)"""
    lib = library()
    state = packed_state(module)
    if lib is None or state is None or module.training:
        return None
    if variant == "int8":
        return _int8_forward(lib, module, state) if vnni_cpu() else None
    n, k, block = int(state.shape[0]), int(state.shape[1]), int(state.blocksize)
    weight = module.weight.data.contiguous()
    absmax = state.absmax.contiguous()
    dtype = torch.float32 if variant == "float32" else torch.bfloat16
    code = state.code.to(dtype).contiguous()
    fn = lib.q4_matmul_f32 if variant == "float32" else lib.q4_matmul_bf16
    fixed = [ctypes.c_void_p(weight.data_ptr()), ctypes.c_void_p(absmax.data_ptr()), ctypes.c_int64(block)]
    code_ptr = ctypes.c_void_p(code.data_ptr())
    c_n, c_k = ctypes.c_int64(n), ctypes.c_int64(k)
    bias = module.bias

    def forward(x: torch.Tensor, _keep: tuple[torch.Tensor, ...] = (weight, absmax, code)) -> torch.Tensor:
        # _keep: the tensors the pointers point into live as long as this forward
        a = x.reshape(-1, k).to(dtype).contiguous()
        out = torch.empty((a.shape[0], n), dtype=torch.float32)
        rc = fn(
            ctypes.c_int64(a.shape[0]), c_n, c_k, ctypes.c_void_p(a.data_ptr()), c_k, *fixed, code_ptr,
            ctypes.c_void_p(out.data_ptr()), c_n, ctypes.c_int(torch.get_num_threads()),
        )  # fmt: skip
        if rc != 0:  # unreachable: packed_state checked the shape
            raise RuntimeError(f"4-bit kernel refused shape {tuple(a.shape)} x {(n, k)}")
        return _finish(out, x, bias, n)

    return forward


def vnni_cpu() -> bool:
    """Whether this CPU has AVX512-VNNI (the int8 variant's dot products)."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)  # torch's own CPU probe (private: may go away)
    return bool(probe and probe()) and torch.backends.cpu.get_cpu_capability() == "AVX512"


def _finish(out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """A kernel's float32 rows as the layer's output: x's dtype and leading shape, the bias added."""
    result = out if x.dtype == torch.float32 else out.to(x.dtype)
    if bias is not None:
        result += bias.to(result.dtype)
    return result.reshape(*x.shape[:-1], n)


def _int8_forward(lib: ctypes.CDLL, module: Any, state: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The int8 variant's forward: float32 input, quantized to int8 in the kernel (its own scratch)."""
    n, k, block = int(state.shape[0]), int(state.shape[1]), int(state.blocksize)
    if block % 4:
        return None
    weight = module.weight.data.contiguous()
    absmax = state.absmax.contiguous()
    code = state.code.to(torch.float32).contiguous()
    fn = lib.q4_matmul_i8
    bias = module.bias

    def forward(x: torch.Tensor, _keep: tuple[torch.Tensor, ...] = (weight, absmax, code)) -> torch.Tensor:
        a = x.reshape(-1, k).to(torch.float32).contiguous()
        m = a.shape[0]
        out = torch.empty((m, n), dtype=torch.float32)
        rc = fn(
            m, n, k, a.data_ptr(), k, weight.data_ptr(), absmax.data_ptr(), block, code.data_ptr(), out.data_ptr(),
            n, torch.get_num_threads(),
        )  # fmt: skip
        if rc == -2:
            raise MemoryError(f"int8 4-bit kernel: no memory for the int8 copy of {m} rows of {k}")
        if rc != 0:  # unreachable: packed_state and the block size were checked
            raise RuntimeError(f"int8 4-bit kernel refused shape {tuple(a.shape)} x {(n, k)}")
        return _finish(out, x, bias, n)

    return forward


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [n, k] as the bf16 layout of `bf16w_matmul`: [n/32, k, 32], n padded with zeros to whole blocks."""
    n, k = weight.shape
    padded = torch.zeros(-(-n // BLOCK_N) * BLOCK_N, k, dtype=torch.bfloat16)
    padded[:n] = weight.detach()
    return padded.view(-1, BLOCK_N, k).transpose(1, 2).contiguous()


def bf16_weight_matmul(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """rows [m, k] -> rows x weight^T [m, n] in float32, from a bf16 copy of `weight` ([n, k], made here) and
    float32 FMAs; None where the kernels are not built."""
    lib = library()
    if lib is None or weight.dim() != 2:
        return None
    n, k = weight.shape
    packed = pack_bf16(weight)
    fn, c_k = lib.bf16w_matmul, ctypes.c_int64(k)
    w_ptr, ld = ctypes.c_void_p(packed.data_ptr()), ctypes.c_int64(packed.shape[0] * BLOCK_N)

    def matmul(x: torch.Tensor, _keep: torch.Tensor = packed) -> torch.Tensor:
        a = x.to(torch.float32).contiguous()
        out = torch.empty((a.shape[0], packed.shape[0] * BLOCK_N), dtype=torch.float32)
        rc = fn(
            ctypes.c_int64(a.shape[0]), ctypes.c_int64(out.shape[1]), c_k, ctypes.c_void_p(a.data_ptr()), c_k,
            w_ptr, ctypes.c_void_p(out.data_ptr()), ld, ctypes.c_int(torch.get_num_threads()),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"bf16 kernel refused shape {tuple(a.shape)} x {(n, k)}")
        return out[:, :n]

    return matmul


LORA_MAX_RANK = 128  # as the kernel's


@cache
def lora_kernel() -> Callable[..., bool] | None:
    """`add(x, A, Bt, scale, slots, out)`: out [rows, n] += scale[s] * x A[s]^T Bt[s] for each row, s its sequence's
    slot (`slots`, one per sequence of rows/len(slots) rows; slot 0 adds nothing), on the CPU. A [S, R, k],
    Bt [S, R, n] and scale [S] are a `slots.SlotLinear`'s own tensors (float32, contiguous) and `slots` a
    `LoraSlots`' rows (int64, valid slots); x and out are checked: False (nothing done) where they do not fit the
    kernel, and the caller computes the delta otherwise. None where the kernels are not built or the CPU has no
    AVX512F."""
    lib = library()
    if lib is None or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return None
    fn = lib.lora_add
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [i64, i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, ctypes.c_int]
    f32 = torch.float32

    def add(
        x: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, scale: torch.Tensor, slots: torch.Tensor, out: torch.Tensor
    ) -> bool:
        _, rank, k = A.shape
        n, seqs = Bt.shape[2], len(slots)
        m = out.numel() // n
        if (
            x.dtype != f32 or out.dtype != f32 or not x.is_contiguous() or not out.is_contiguous()
            or x.numel() != m * k or rank > LORA_MAX_RANK or m % seqs or x.device.type != "cpu"
        ):  # fmt: skip
            return False
        rc = fn(
            m, n, k, rank, x.data_ptr(), k, A.data_ptr(), Bt.data_ptr(), scale.data_ptr(), slots.data_ptr(), m // seqs,
            out.data_ptr(), n, torch.get_num_threads(),
        )  # fmt: skip
        return rc == 0

    return add

"""Inference fast paths the engine puts on its base, for CPUs with native bf16 dot products (AVX512-BF16).

On such a CPU bitsandbytes already computes every 4-bit layer with a fused CPU kernel (on weights it packs
for it at the layer's first inference forward), and the engine adds two things around that:

- `lean_4bit`: a fused kernel called directly. `Linear4bit.forward` reaches bitsandbytes' through five Python
  layers (quant-state checks, `matmul_4bit`, the op dispatcher, dtype casts of the input and of the block
  scales) that cost about 35 us a call, about 7 ms of a 16-row decoding step of the embedded base (210 calls);
  called directly, its output is bit for bit the module's own (`tests/test_fastpath.py`). That kernel takes
  one row at a time, so loraswap's own (`q4.py`), which dequantize each weight tile once for 8 rows, can
  take its place: `auto` times bitsandbytes' and loraswap's float32 and bf16 kernels on the largest layer at
  the server's batch size and keeps the fastest (loraswap's float32 one on a 2-core Xeon: 121 against 249 us
  for 16 rows of a 1536 x 576 layer). `LORASWAP_Q4_KERNEL` decides instead.
- `bf16_head`: the vocabulary projection (the LM head, 49,152 x 576 on the embedded base, dense and float32)
  from a bf16 copy of its weight, where that is measured to be faster on this CPU at the server's batch size
  (`auto`), by oneDNN's bf16 matmul or by loraswap's kernel (float32 FMAs on the bf16 weight: half the memory
  traffic, no bf16 dot products), whichever is faster: 6.2 ms instead of 19.2 at 16 rows by oneDNN on a 2-core
  AVX512-BF16 EPYC; on a 2-core Xeon with the same instructions oneDNN's is slower than float32 (9.7 against
  8.9 ms) and loraswap's kernel faster (6.0). Rounding the weight (and, in oneDNN's, the input) to bf16 moves
  a logit by about its rounding, enough to flip near-ties of a small model's greedy choice, so each position's
  8 highest logits are then recomputed exactly from the float32 weight (0.8 ms more): greedy decoding picks
  what the float32 head picks, the other logits (sampling's tail) keep bf16 precision. The head holds a bf16
  copy of its weight beside the float32 one (tied to the input embeddings on many bases).
  `LORASWAP_LM_HEAD=float32` or `bfloat16` decides instead of measuring.

Neither applies on CUDA (bitsandbytes' CUDA kernels and a bf16 compute dtype are already the fast path)
or on CPUs without AVX512-BF16, where bf16 matmuls are emulated and far slower than float32.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, cast, get_args

import torch
import torch.nn.functional as F

from loraswap.server.settings import LmHead, Q4Kernel
from loraswap.server.worker import q4

log = logging.getLogger(__name__)

Q4_KERNELS: tuple[Q4Kernel, ...] = get_args(Q4Kernel)
Q4_CHOICES: tuple[Q4Kernel, ...] = tuple(k for k in Q4_KERNELS if k != "auto")
"""The kernels themselves: what `auto` times and chooses among."""
KERNEL_NAMES = {
    "bitsandbytes": "bitsandbytes' fused CPU kernel",
    "float32": "loraswap's float32 4-bit kernel",
    "bfloat16": "loraswap's bf16 4-bit kernel",
    "int8": "loraswap's int8-activation 4-bit kernel",
}
RESCORED = 8  # logits per position the bf16 head recomputes in float32


@functools.cache
def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 dot-product instructions (bitsandbytes' own test)."""
    try:
        from bitsandbytes.functional import has_avx512bf16

        return bool(has_avx512bf16())
    except Exception as e:  # no bitsandbytes, or a build without its CPU library
        log.info(
            "no bf16 fast paths: bitsandbytes' test for bf16 instructions cannot run (%s: %s)", type(e).__name__, e
        )
        return False


@functools.cache
def _bitsandbytes_cpu_kernels() -> tuple[Any, Any] | None:
    """bitsandbytes' CPU ops and C library (where its fused 4-bit kernels are), or None, said once in the log."""
    try:
        from bitsandbytes.backends.cpu import ops
        from bitsandbytes.cextension import lib
    except Exception as e:  # a bitsandbytes without its CPU backend, or another layout of it
        log.warning(
            "bitsandbytes' fused CPU 4-bit kernel cannot be called directly (%s: %s); a 4-bit layer that "
            "loraswap's kernels do not take runs as loaded",
            type(e).__name__,
            e,
        )
        return None
    return ops, lib


@functools.cache
def _linear4bit() -> type | None:
    """bitsandbytes' 4-bit layer class, or None, said once in the log."""
    try:
        from bitsandbytes.nn import Linear4bit
    except Exception as e:  # no bitsandbytes: there are no 4-bit layers to speed up
        log.info("no 4-bit fast path: bitsandbytes cannot be imported (%s: %s)", type(e).__name__, e)
        return None
    return cast(type, Linear4bit)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


FASTEST = "fastest"
"""`bf16_head`'s way when it is to time the bf16 matmuls and keep the faster."""


def head_dtype(model: Any, choice: LmHead, rows: int = 16) -> torch.dtype | None:
    """The dtype the LM head should compute in, or None to leave it as loaded; `auto` measures, at `rows` rows."""
    return None if head_way(model, choice, rows) is None else torch.bfloat16


def head_way(model: Any, choice: LmHead, rows: int = 16) -> str | None:
    """How the LM head should compute: None leaves it as loaded; else the bf16 matmul (`bf16_matmuls`) for
    `bf16_head`, FASTEST where it is still to be timed. `auto` measures, at `rows` rows, and names the way it
    measured faster."""
    if choice == "float32" or _device(model).type != "cpu":
        return None
    if choice == "bfloat16":
        return FASTEST
    head = model.get_output_embeddings()
    if not native_bf16_cpu() or not isinstance(head, torch.nn.Linear) or head.weight.dtype != torch.float32:
        return None
    return bf16_pays(head.weight, rows) or None


BF16_MARGIN = 1.25
"""How much faster a bf16 matmul must be than a float32 one to pay for a copy of the weight and the rescoring."""


def bf16_pays(weight: torch.Tensor, rows: int, repeats: int = 7) -> str | None:
    """The faster way of `bf16_matmuls` when `rows` rows times `weight` (float32, [out, in]) runs at least BF16_MARGIN
    times faster that way than in float32 on this CPU, else None: medians of interleaved runs (a few tens of ms
    for the embedded base's head)."""
    x = torch.randn(max(1, rows), weight.shape[1])
    calls: dict[str, Callable[[], Any]] = {"float32": lambda: F.linear(x, weight)}
    calls.update({name: functools.partial(fn, x) for name, fn in bf16_matmuls(weight).items()})
    times = _median_times(calls, repeats, warm=False)
    log.info("LM head at %d rows, median ms: %s", rows, {n: round(t * 1e3, 2) for n, t in times.items()})
    best = min((name for name in times if name != "float32"), key=times.__getitem__)
    return best if times[best] * BF16_MARGIN < times["float32"] else None


def bf16_matmuls(weight: torch.Tensor, only: str | None = None) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The ways to multiply float32 rows by a bf16 copy of `weight` ([out, in]), each holding its own copy (`only`:
    just that one): `bfloat16`, a bf16 matmul (oneDNN; the rows rounded to bf16), and `loraswap`, loraswap's kernel
    (float32 FMAs on the bf16 weight: half the memory traffic of float32 without the bf16 dot products, slow on
    some CPUs; `q4.py`) where it is built."""
    ways: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    if only in (None, "bfloat16"):
        copy = weight.detach().to(torch.bfloat16)

        def onednn(rows: torch.Tensor) -> torch.Tensor:
            return F.linear(rows.to(torch.bfloat16), copy).to(rows.dtype)

        ways["bfloat16"] = onednn
    kernel = q4.bf16_weight_matmul(weight) if only in (None, "loraswap") and native_bf16_cpu() else None
    if kernel is not None:
        ways["loraswap"] = kernel
    return ways


def bf16_head(model: Any, rescored: int = RESCORED, rows: int = 16, way: str = FASTEST) -> bool:
    """Compute the output projection from a bf16 copy of its weight (`way` of `bf16_matmuls`; FASTEST: the faster
    at `rows` rows), then recompute each position's `rescored` highest logits exactly from the float32 weight, so
    that greedy decoding picks what the float32 head would (the bf16 pass only has to rank the true best among
    its top few). True if done."""
    head = model.get_output_embeddings()
    if getattr(head, "loraswap_bf16", False):
        return True  # already done
    if head is None or not isinstance(head, torch.nn.Linear) or head.weight.dtype != torch.float32:
        return False
    exact_weight = head.weight  # the float32 weight, tied to the input embeddings on many bases
    ways = bf16_matmuls(exact_weight, None if way == FASTEST else way)
    if len(ways) > 1:
        x = torch.randn(max(1, rows), exact_weight.shape[1])
        fastest = _fastest({name: functools.partial(fn, x) for name, fn in ways.items()}, "LM head", rows)
        ways = {fastest: ways[fastest]}  # the other copy is dropped
    (way, matmul), *_ = ways.items()
    bias = head.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        # 2-D and contiguous first: a [1, 1, hidden] slice of a prefill keeps its parent's strides through `.to`,
        # and oneDNN's bf16 matmul takes a slow path on them (50 ms instead of 4 for one row of the embedded base).
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        logits = matmul(rows).to(x.dtype)  # [positions, vocabulary]
        top = logits.topk(min(rescored, logits.shape[-1]), dim=-1).indices  # [positions, rescored]
        exact = torch.einsum("nh,nkh->nk", rows, exact_weight[top].to(x.dtype))
        logits.scatter_(1, top, exact)
        if bias is not None:
            logits += bias.to(logits.dtype)
        return logits.reshape(*x.shape[:-1], logits.shape[-1])

    _patch(head, forward)
    object.__setattr__(head, "loraswap_bf16", way)
    return True


def _patch(module: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """`module.forward` becomes `forward` for this instance only (`nn.Module.__call__` calls it)."""
    object.__setattr__(module, "forward", forward)


def _packed_kernel(module: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A direct call of bitsandbytes' fused CPU 4-bit kernel for `module`, once its weight is in the kernel's
    packed layout; None where that layout or kernel is not there (another bitsandbytes, no AVX512-BF16)."""
    kernels = _bitsandbytes_cpu_kernels()
    if kernels is None:
        return None
    ops, lib = kernels
    state = getattr(module.weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False) or module.training:
        return None
    if state.absmax.dtype != torch.bfloat16 or module.weight.dtype != torch.uint8 or len(state.shape) != 2:
        return None
    quant_type = "fp4" if state.code[1] > 0 else "nf4"  # bitsandbytes' own test, in the same op
    n, k = int(state.shape[0]), int(state.shape[1])
    weight, absmax, blocksize = module.weight.data, state.absmax, int(state.blocksize)
    bias = module.bias
    hub_kernel = getattr(ops, "gemm_4bit_forward_kernel", None)
    c_fn = getattr(lib, f"gemv_4bit_inference_cpu_{quant_type}_bf16", None)
    if hub_kernel is None and c_fn is None:
        return None
    c_n, c_k, c_block = ctypes.c_int64(n), ctypes.c_int64(k), ctypes.c_int64(blocksize)
    w_ptr, absmax_ptr = ctypes.c_void_p(weight.data_ptr()), ctypes.c_void_p(absmax.data_ptr())
    weight_2d = weight.reshape(n, -1).contiguous()
    quant_num = 1 if quant_type == "fp4" else 0

    def forward(x: torch.Tensor) -> torch.Tensor:
        a = x.reshape(-1, k).to(torch.bfloat16).contiguous()
        if hub_kernel is not None:
            out = hub_kernel(a, weight_2d, absmax, blocksize, quant_num)
        else:
            assert c_fn is not None
            out = torch.empty((a.shape[0], n), dtype=torch.bfloat16)
            stride = ctypes.c_int64(k)
            c_fn(
                ctypes.c_int64(a.shape[0]), c_n, c_k, ctypes.c_void_p(a.data_ptr()), w_ptr, absmax_ptr,
                ctypes.c_void_p(out.data_ptr()), c_block, stride, c_n,
            )  # fmt: skip
        out = out.to(x.dtype)
        if bias is not None:
            out += bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], n)

    return forward


def _pack(model: Any) -> list[Any]:
    """The model's 4-bit layers, after one token has run through the model (bitsandbytes packs a layer's
    weight for its CPU kernel at the layer's first inference forward); [] where no CPU kernel applies."""
    linear4bit = _linear4bit()
    if linear4bit is None:
        return []
    layers = [m for m in model.modules() if isinstance(m, linear4bit)]
    if not layers or _device(model).type != "cpu" or not native_bf16_cpu():
        return []
    token = torch.zeros((1, 1), dtype=torch.long)
    decoder = {"decoder_input_ids": token} if getattr(model.config, "is_encoder_decoder", False) else {}
    with torch.inference_mode():
        model(input_ids=token, use_cache=False, **decoder)
    return layers


def _forward_for(module: Any, kernel: Q4Kernel) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if kernel == "bitsandbytes":
        return _packed_kernel(module)
    if kernel == "auto":
        raise ValueError("auto is decided by measuring")
    return q4.kernel(module, kernel)


def lean_4bit(model: Any, kernel: Q4Kernel = "bitsandbytes", rows: int = 16) -> tuple[int, Q4Kernel | None]:
    """Call a fused CPU kernel directly in every 4-bit layer that bitsandbytes has packed for it:
    bitsandbytes' own, or one of loraswap's (`q4.py`); `auto` times each on the largest layer at `rows` rows
    and takes the fastest. (How many layers now do, the kernel); a layer the chosen kernel cannot take gets
    bitsandbytes' own, and where that is missing too the layer stays as loaded."""
    layers = _pack(model)
    if kernel == "auto":
        kernel = _fastest_kernel(layers, rows) if layers else "bitsandbytes"
    counts: Counter[Q4Kernel] = Counter()
    for module in layers:
        for name in dict.fromkeys((kernel, "bitsandbytes")):
            forward = _forward_for(module, name)
            if forward is not None:
                _patch(module, forward)
                counts[name] += 1
                break
    return sum(counts.values()), (counts.most_common(1)[0][0] if counts else None)


def _fastest_kernel(layers: list[Any], rows: int) -> Q4Kernel:
    """The kernel that computes the largest of `layers` fastest at `rows` rows (bitsandbytes' where none runs)."""
    largest = max(layers, key=lambda m: m.weight.numel())
    x = torch.randn(max(1, rows), largest.in_features)
    calls: dict[str, Callable[[], Any]] = {}
    for name in Q4_CHOICES:
        forward = _forward_for(largest, name)
        if forward is not None:
            calls[name] = functools.partial(forward, x)
    if not calls:
        return "bitsandbytes"
    return cast(Q4Kernel, _fastest(calls, "4-bit kernels", rows))


def _fastest(calls: dict[str, Callable[[], Any]], what: str, rows: int) -> str:
    """The name of the call with the lowest median time (logged, as `what` at `rows` rows)."""
    times = _median_times(calls)
    log.info("%s at %d rows, median us: %s", what, rows, {n: round(t * 1e6, 1) for n, t in times.items()})
    return min(times, key=times.__getitem__)


def _median_times(calls: dict[str, Callable[[], Any]], repeats: int = 7, warm: bool = True) -> dict[str, float]:
    """Median seconds of each call, timed interleaved (after one untimed call each where `warm`)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for fn in calls.values() if warm else ():
            fn()
        for _ in range(repeats):
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def apply(model: Any, lm_head: LmHead = "auto", rows: int = 16, q4_kernel: Q4Kernel = "auto") -> dict[str, Any]:
    """Put the fast paths on `model` (a base about to serve decoding steps of up to `rows` rows); what was done, for
    the log and /v1/models."""
    lean, kernel = lean_4bit(model, q4_kernel, rows)
    way = head_way(model, lm_head, rows)
    head = bf16_head(model, rows=rows, way=way) if way is not None else False
    done = {
        "lean_4bit_layers": lean,
        "q4_kernel": kernel,
        "lm_head": _head_weight_dtype(model),
        "rescored": RESCORED if head else 0,
    }
    if head:
        done["lm_head"] = "bfloat16"
        done["lm_head_matmul"] = model.get_output_embeddings().loraswap_bf16
    log.info("inference fast paths: %s", done)
    return done


def describe(done: dict[str, Any]) -> str:
    """One line for the log: what `apply` did."""
    lean, kernel = done["lean_4bit_layers"], str(done.get("q4_kernel"))
    parts = [
        f"{lean} 4-bit layers call {KERNEL_NAMES.get(kernel, kernel)} directly" if lean else "4-bit layers as loaded"
    ]
    how = {"loraswap": "loraswap's kernel, "}.get(done.get("lm_head_matmul", ""), "")
    rescored = f" ({how}top {done['rescored']} logits in float32)" if done["rescored"] else ""
    parts.append(f"LM head in {done['lm_head']}{rescored}")
    return "inference fast paths: " + ", ".join(parts)


def _head_weight_dtype(model: Any) -> str:
    head = model.get_output_embeddings()
    return str(head.weight.dtype).removeprefix("torch.") if head is not None else "none"

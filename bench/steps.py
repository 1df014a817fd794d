"""Time the engine's steps in this process, without HTTP: prefill and decoding step at a given batch.

    python -m loraswap.bench.steps --batch 16 --adapters 16 [--impl batched|peft] [--tokens 32]
        [--no-prefix-cache] [--closed SECONDS] [--lm-head auto|float32|bfloat16]
        [--q4-kernel auto|bitsandbytes|float32|bfloat16|int8] [--no-fast-paths] [--profile] [--lora-kernel-ab ROUNDS]
        [--q4-kernel-ab KERNEL,KERNEL [--ab-rounds ROUNDS]]

Synthetic rank-8 adapters (as `loraswap bench` makes them) fill a temporary store; `--profile`
prints cProfile's top functions of the timed part; `--closed` then keeps `--batch` requests in flight
for that many seconds (a new one as soon as one finishes, prompts cycling through the questions, the
first round's lengths staggered so that requests finish and join one at a time), the
engine's own closed loop with joins and prefills, as the server's clients load it. For finding where a
step's time goes before changing anything. `--lora-kernel-ab` instead times the decoding step with the LoRA
deltas in loraswap's CPU kernel and in torch (`LoraSlots.set_kernel`), alternating round by round in the
one engine, so that the machine's noise hits both; `--q4-kernel-ab float32,int8` the same for two kernels of
the 4-bit layers (`fastpath.lean_4bit` switches them), prefill and decoding step.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="embedded")
    ap.add_argument("--quant", choices=["nf4", "fp4", "int8", "none"], default="nf4", help="how the base is held")
    ap.add_argument("--no-double-quant", action="store_true", help="4-bit without double quantization")
    ap.add_argument("--no-quant", action="store_true", help=argparse.SUPPRESS)  # --quant none
    ap.add_argument("--impl", choices=["batched", "peft"], default="batched")
    ap.add_argument("--batch", type=int, default=8, help="requests decoded together")
    ap.add_argument("--adapters", type=int, default=8, help="distinct adapters over the batch (0: base only)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--no-prefix-cache", action="store_true", help="prefill whole prompts every time")
    ap.add_argument("--closed", type=float, default=0, help="then a closed loop of this many seconds")
    ap.add_argument("--lm-head", choices=["auto", "float32", "bfloat16"], default="auto", help="as serve's --lm-head")
    from loraswap.server.worker.fastpath import Q4_KERNELS

    ap.add_argument("--q4-kernel", choices=Q4_KERNELS, default="auto", help="as serve's --q4-kernel")
    ap.add_argument("--no-fast-paths", action="store_true", help="the base as loaded, as before `fastpath.py`")
    ap.add_argument(
        "--head-agreement", action="store_true", help="instead: greedy answers with the float32 and the bf16 LM head"
    )
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--lora-kernel-ab", type=int, default=0, metavar="ROUNDS", help="instead: kernel vs torch")
    ap.add_argument("--q4-kernel-ab", default=None, metavar="A,B", help="instead: two 4-bit kernels, alternating")
    ap.add_argument("--ab-rounds", type=int, default=8, help="rounds of each kernel for --q4-kernel-ab")
    args = ap.parse_args(argv)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("loraswap.server.worker.fastpath").setLevel(logging.INFO)  # what `auto` timed, and chose

    from loraswap.adapters.archive import install_archive
    from loraswap.adapters.base import load_base, resolve_base
    from loraswap.adapters.prompt import prompt_ids
    from loraswap.adapters.store import AdapterStore
    from loraswap.bench.load import QUESTIONS
    from loraswap.bench.synth import archive, synth_lora
    from loraswap.server.jobs import Job
    from loraswap.server.settings import PREFIX_CACHE_BYTES
    from loraswap.server.worker import fastpath
    from loraswap.server.worker.engine import Engine

    ref = resolve_base(args.base)
    with tempfile.TemporaryDirectory() as tmp:
        store_dir = Path(tmp) / "store"
        for i in range(args.adapters):
            folder = synth_lora(ref, Path(tmp) / "synth" / str(i), seed=i + 1)
            install_archive(archive(folder), f"a{i:02d}", store_dir, ref)
        base = load_base(ref, quant="none" if args.no_quant else args.quant, double_quant=not args.no_double_quant)
        if args.head_agreement:
            head_agreement(base, AdapterStore(store_dir, shipped_dir=None), args)
            return
        if not args.no_fast_paths:
            done = fastpath.apply(base.model, args.lm_head, rows=args.batch, q4_kernel=args.q4_kernel)
            print(fastpath.describe(done))
        engine = Engine(
            base.model,
            base.tokenizer,
            AdapterStore(store_dir, shipped_dir=None).get,
            max_batch_size=args.batch,
            max_loaded=max(1, args.adapters),
            lora_impl=args.impl,
            max_prefill_tokens=1 << 20,  # the whole batch joins in one prefill
            prefix_cache_bytes=0 if args.no_prefix_cache else PREFIX_CACHE_BYTES,
        )

        def run(tokens: int, tag: str) -> tuple[float, float]:
            for i in range(args.batch):
                adapter = f"a{i % args.adapters:02d}" if args.adapters else None
                ids = prompt_ids(base.tokenizer, QUESTIONS[i % len(QUESTIONS)])
                engine.submit(Job(f"{tag}{i}", ids, adapter, max_tokens=tokens, ignore_eos=True))
            start = time.perf_counter()
            engine.step()
            prefill = time.perf_counter() - start
            start, steps = time.perf_counter(), 0
            while engine.has_work():
                engine.step()
                steps += 1
            return prefill, (time.perf_counter() - start) / max(steps, 1)

        run(4, "warm")  # loads the adapters, warms the kernels (and the prefix cache: its system-turn blocks)
        if args.lora_kernel_ab:
            lora_kernel_ab(engine, run, args)
            return
        if args.q4_kernel_ab:
            q4_kernel_ab(base.model, run, args)
            return
        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        prefill, step = run(args.tokens, "r")
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        tokens_s = closed_loop(engine, base.tokenizer, args) if args.closed > 0 else None
    print(
        f"impl {args.impl}, batch {args.batch}, {args.adapters} adapters: prefill {1000 * prefill:.0f} ms, "
        f"decoding step {1000 * step:.1f} ms, {args.batch / step:.1f} tokens/s while decoding"
    )
    if tokens_s is not None:
        print(f"closed loop of {args.batch} requests of {args.tokens} tokens: {tokens_s:.1f} tokens/s")


def lora_kernel_ab(engine: Any, run: Callable[[int, str], tuple[float, float]], args: argparse.Namespace) -> None:
    """Median decoding step with the LoRA kernel and with torch's ops, `args.lora_kernel_ab` rounds of each,
    alternating."""
    import statistics

    slots = engine.residency.slots
    if slots is None or slots.native is None:
        raise SystemExit("no LoRA kernel here (not the batched slots, not a CPU with AVX512F, or no C compiler)")
    steps: dict[str, list[float]] = {"kernel": [], "torch": []}
    for i in range(args.lora_kernel_ab):
        for way in ("kernel", "torch") if i % 2 == 0 else ("torch", "kernel"):
            slots.set_kernel(way == "kernel")
            steps[way].append(run(args.tokens, f"{way}{i}.")[1])
    slots.set_kernel(True)
    k, t = statistics.median(steps["kernel"]), statistics.median(steps["torch"])
    print(
        f"batch {args.batch}, {args.adapters} adapters, {args.lora_kernel_ab} rounds each: decoding step "
        f"{1000 * k:.1f} ms with the LoRA kernel, {1000 * t:.1f} ms in torch (torch/kernel {t / k:.3f})"
    )


def q4_kernel_ab(model: Any, run: Callable[[int, str], tuple[float, float]], args: argparse.Namespace) -> None:
    """Median prefill and decoding step on each of two 4-bit kernels, `args.ab_rounds` rounds of each, alternating."""
    import statistics

    from loraswap.server.worker import fastpath

    kernels = [k.strip() for k in args.q4_kernel_ab.split(",")]
    if len(kernels) != 2 or not set(kernels) <= set(fastpath.Q4_CHOICES):
        raise SystemExit(f"--q4-kernel-ab takes two of {', '.join(fastpath.Q4_CHOICES)}")
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in kernels}
    for i in range(args.ab_rounds):
        for kernel in kernels if i % 2 == 0 else kernels[::-1]:
            if fastpath.lean_4bit(model, kernel)[1] != kernel:
                raise SystemExit(f"the {kernel} kernel is not available here")
            times[kernel].append(run(args.tokens, f"{kernel}{i}."))
    (a, b), med = kernels, {k: [statistics.median(t[j] for t in v) for j in (0, 1)] for k, v in times.items()}
    print(
        f"batch {args.batch}, {args.adapters} adapters, {args.ab_rounds} rounds each: prefill {1000 * med[a][0]:.0f} "
        f"ms on {a}, {1000 * med[b][0]:.0f} on {b} ({a}/{b} {med[a][0] / med[b][0]:.3f}); decoding step "
        f"{1000 * med[a][1]:.1f} ms on {a}, {1000 * med[b][1]:.1f} on {b} ({a}/{b} {med[a][1] / med[b][1]:.3f})"
    )


def head_agreement(base: Any, store: Any, args: argparse.Namespace) -> None:
    """Every question of the load pool (over the shipped adapters, or `--adapters` synthetic ones, and the base),
    greedy, `--tokens` tokens, with the float32 head and then the bf16 head; prefix caching off, so both passes
    compute the same prompts the same way. Prints how many answers are identical."""
    from loraswap.adapters.prompt import prompt_ids
    from loraswap.adapters.store import SHIPPED_DIR, AdapterStore
    from loraswap.bench.load import QUESTIONS
    from loraswap.server.jobs import Job
    from loraswap.server.worker import fastpath
    from loraswap.server.worker.engine import Engine

    if not args.adapters:
        store = AdapterStore(store.user_dir, shipped_dir=SHIPPED_DIR)
    names: list[str | None] = [None, *sorted(store.entries())]
    engine = Engine(base.model, base.tokenizer, store.get, max_batch_size=args.batch, max_loaded=len(names),
                    prefix_cache_bytes=0)  # fmt: skip
    fastpath.lean_4bit(base.model)  # bit for bit bitsandbytes' own: only the head differs between the passes

    def answers(tag: str) -> dict[int, str]:
        for i, q in enumerate(QUESTIONS):
            ids = prompt_ids(base.tokenizer, q)
            engine.submit(Job(f"{tag}{i}", ids, names[i % len(names)], max_tokens=args.tokens, ignore_eos=True))
        text: dict[int, str] = {}
        while engine.has_work():
            for e in engine.step():
                key = int(e.uid.removeprefix(tag))
                text[key] = text.get(key, "") + e.text
        return text

    exact = answers("f")
    if not fastpath.bf16_head(base.model):
        raise SystemExit("the base's LM head is not a float32 linear layer")
    fast = answers("b")
    same = sum(exact[i] == fast[i] for i in exact)
    way = base.model.get_output_embeddings().loraswap_bf16  # which bf16 matmul `bf16_head` measured faster
    print(
        f"greedy answers of {args.tokens} tokens identical with the float32 and the bf16 head ({way}): "
        f"{same} of {len(exact)}"
    )


def closed_loop(engine: Any, tokenizer: Any, args: argparse.Namespace) -> float:
    """Tokens/s with `args.batch` requests always in flight for `args.closed` seconds (after one round of
    warm-up), counting the tokens of the requests that finished inside the window."""
    from loraswap.adapters.prompt import prompt_ids
    from loraswap.bench.load import QUESTIONS
    from loraswap.server.jobs import Job

    sent = 0

    def submit(tokens: int = args.tokens) -> None:
        nonlocal sent
        adapter = f"a{sent % args.adapters:02d}" if args.adapters else None
        ids = prompt_ids(tokenizer, QUESTIONS[sent % len(QUESTIONS)])
        engine.submit(Job(f"c{sent}", ids, adapter, max_tokens=tokens, ignore_eos=True))
        sent += 1

    for i in range(args.batch):  # staggered lengths: from then on requests finish and join one by one
        submit(max(1, args.tokens * (i + 1) // args.batch))
    start: float | None = None
    tokens, finished = 0, 0
    while start is None or time.perf_counter() - start < args.closed:
        for event in engine.step():
            if event.finish_reason:
                finished += 1
                if start is not None:
                    tokens += event.completion_tokens
                submit()
        if start is None and finished >= args.batch:  # the staggered first round is warm-up
            start = time.perf_counter()
    return tokens / (time.perf_counter() - start)


if __name__ == "__main__":
    main()

"""`loraswap train`, `train-router` and `train-bench`: adapters, the qtype router and training speed."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from loraswap.commands.options import (
    DEFAULT_DATA,
    BaseOpt,
    DataOpt,
    DoubleQuantOpt,
    NoQuantOpt,
    QuantOpt,
    UsageError,
    pick_quant,
    quiet_libraries,
)


def train(
    qtype: Annotated[
        list[str] | None, typer.Option("--qtype", help="Question type to train an adapter for; repeat for several.")
    ] = None,
    all_qtypes: Annotated[
        bool, typer.Option("--all-qtypes", help="Train every qtype with at least --min-rows training rows.")
    ] = False,
    data: DataOpt = DEFAULT_DATA,
    out: Annotated[
        Path, typer.Option("--out", help="Store directory; each adapter is written to OUT/<name> atomically.")
    ] = Path("adapters-out"),
    base: BaseOpt = "embedded",
    method: Annotated[
        str, typer.Option("--method", help="lora (default), prefix, prompt (prompt tuning) or ptuning.")
    ] = "lora",
    max_steps: Annotated[int, typer.Option("--max-steps", help="Optimizer steps per adapter; -1 uses --epochs.")] = 60,
    epochs: Annotated[
        float, typer.Option("--epochs", help="Epochs over the training rows when --max-steps is -1.")
    ] = 1.0,
    max_examples: Annotated[
        int | None, typer.Option("--max-examples", help="Use at most this many training rows per qtype.")
    ] = None,
    max_seq_len: Annotated[
        int, typer.Option("--max-seq-len", help="Prompt + answer tokens; longer answers are cut.")
    ] = 256,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Peak learning rate (default 5e-4 for LoRA, 1e-2..3e-2 otherwise).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per micro-batch.")] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling, shuffling and initialisation.")] = 0,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank r.")] = 8,
    alpha: Annotated[int, typer.Option("--alpha", help="LoRA alpha (scale alpha/r).")] = 32,
    dropout: Annotated[float, typer.Option("--dropout", help="LoRA dropout.")] = 0.1,
    target_modules: Annotated[
        str,
        typer.Option(
            "--target-modules",
            help="Comma-separated module names LoRA adapts, or 'all-linear'. Default: the base architecture's "
            "attention query and value projections (q_proj,v_proj for Llama, Qwen2, Gemma, Phi; q,v for T5): "
            "the LoRA paper's choice, small adapters.",
        ),
    ] = "",
    num_virtual_tokens: Annotated[
        int, typer.Option("--num-virtual-tokens", help="Virtual tokens for prefix/prompt/ptuning.")
    ] = 20,
    quant: QuantOpt = None,
    double_quant: DoubleQuantOpt = None,
    no_quant: NoQuantOpt = False,
    heldout_fraction: Annotated[
        float, typer.Option("--heldout-fraction", help="Share of distinct questions held out for evaluation.")
    ] = 0.1,
    eval_examples: Annotated[
        int, typer.Option("--eval-examples", help="Held-out questions scored after training (0: skip).")
    ] = 16,
    no_bucketing: Annotated[
        bool, typer.Option("--no-bucketing", help="Random batches instead of length-grouped ones.")
    ] = False,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Trade compute for memory (for large bases).")
    ] = False,
    min_rows: Annotated[int, typer.Option("--min-rows", help="With --all-qtypes, skip qtypes with fewer rows.")] = 50,
    save_steps: Annotated[
        int, typer.Option("--save-steps", help="Checkpoint every N steps (an interrupted run resumes from it).")
    ] = 20,
) -> None:
    """Train one adapter per qtype over the (4-bit) base; resumes from OUT/.work after an interrupt."""
    from loraswap.train.data import qtype_counts
    from loraswap.train.trainer import TrainConfig, train_many

    quiet_libraries()
    if method not in ("lora", "prefix", "prompt", "ptuning"):
        raise UsageError(f"--method {method!r}: use lora, prefix, prompt or ptuning")
    if bool(qtype) == all_qtypes:
        raise UsageError("give --qtype (one or more) or --all-qtypes, not both")
    cfg = TrainConfig(
        method=method,  # type: ignore[arg-type]
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        target_modules=tuple(t.strip() for t in target_modules.split(",") if t.strip()),
        num_virtual_tokens=num_virtual_tokens,
        lr=lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_steps=max_steps,
        epochs=epochs,
        max_examples=max_examples,
        max_seq_len=max_seq_len,
        seed=seed,
        heldout_fraction=heldout_fraction,
        quant=pick_quant(quant, no_quant, double_quant),
        double_quant=double_quant is not False,
        bucketing=not no_bucketing,
        gradient_checkpointing=gradient_checkpointing,
        eval_examples=eval_examples,
        save_steps=save_steps,
    )
    qtypes = list(qtype or [])
    if all_qtypes:
        from loraswap.train.data import load_qa

        counts = qtype_counts(load_qa(data))
        qtypes = [q for q, n in counts.most_common() if n >= min_rows]
        skipped = [f"{q} ({n})" for q, n in counts.items() if n < min_rows]
        if skipped:
            print(f"skipping qtypes with fewer than {min_rows} rows: {', '.join(skipped)}", file=sys.stderr)
    for r in train_many(base, data, qtypes, out, cfg):
        print(f"wrote {r.path} ({r.steps} steps, {r.seconds:.0f} s, {r.tokens_per_s:.0f} tokens/s)")


def train_router(
    data: DataOpt = DEFAULT_DATA,
    out: Annotated[
        Path, typer.Option("--out", help="Where to write the router JSON (the store's router.json serves 'auto').")
    ] = Path("router.json"),
    min_rows: Annotated[int, typer.Option("--min-rows", help="Leave out qtypes with fewer rows.")] = 50,
) -> None:
    """Train the qtype classifier behind adapter 'auto' on the training split; prints held-out accuracy."""
    from loraswap.train.data import load_qa
    from loraswap.train.router import train_router as fit

    router = fit(load_qa(data), min_rows=min_rows)
    router.save(out)
    print(
        f"router over {len(router.classes)} qtypes: held-out accuracy {router.accuracy:.2%} "
        f"on {router.heldout_n} questions; wrote {out}"
    )


def train_bench(
    data: DataOpt = DEFAULT_DATA,
    qtype: Annotated[str, typer.Option("--qtype", help="Rows of this qtype are trained on.")] = "treatment",
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps per run (after one warm-up step).")] = 6,
    rounds: Annotated[int, typer.Option("--rounds", help="Interleaved rounds of (plain, loraswap).")] = 2,
    base: BaseOpt = "embedded",
    quant: QuantOpt = None,
    double_quant: DoubleQuantOpt = None,
    no_quant: NoQuantOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Training tokens/s: loraswap's recipe against the plain Trainer + PEFT QLoRA recipe, interleaved."""
    from loraswap.train.speed import compare

    quiet_libraries()
    with contextlib.redirect_stdout(sys.stderr):  # progress goes to stderr; stdout holds the result only
        chosen = pick_quant(quant, no_quant, double_quant)
        result = compare(base, data, qtype, steps, rounds, quant=chosen, double_quant=double_quant is not False)
    if as_json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")

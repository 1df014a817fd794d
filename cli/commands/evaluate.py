"""`loraswap eval`: the base and adapters on held-out questions (answer NLL, ROUGE-L), or the NLL matrix."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from loraswap.commands.options import (
    DEFAULT_DATA,
    AdaptersDirOpt,
    BaseOpt,
    DataOpt,
    DoubleQuantOpt,
    NoQuantOpt,
    QuantOpt,
    UsageError,
    pick_quant,
    quiet_libraries,
)


def eval_(
    qtype: Annotated[
        list[str] | None, typer.Option("--qtype", help="Held-out qtype to evaluate on; repeat for several.")
    ] = None,
    data: DataOpt = DEFAULT_DATA,
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

    quiet_libraries()
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

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
    record: Annotated[
        bool,
        typer.Option(
            "--record",
            help="Write each adapter's figures on its own qtype (NLL, change against the base with its 95% interval, "
            "n, quant) into its manifest's metrics.",
        ),
    ] = False,
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
    if record and (matrix or "nll" not in wanted):
        raise UsageError("--record needs the nll metric and no --matrix")
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
    chosen_quant = pick_quant(quant, no_quant, double_quant)
    loaded = load_base(ref, chosen_quant, double_quant=double_quant is not False)
    results = evaluate_adapters(loaded, chosen, heldout, wanted, max_seq_len, max_new_tokens)

    if matrix:
        table = {q: {a: r["nll"] for a, r in res.items()} for q, res in results.items()}
        owners = {e.name: e.manifest.qtype for e in chosen}
        best = own_best(table, owners)
        report = {"metric": "nll", "n": limit, "nll": table, "own_best": best}
        out.mkdir(parents=True, exist_ok=True)
        (out / "matrix.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_matrix(table, out / "matrix.png", f"held-out answer NLL, {limit} questions per qtype")
        if as_json:
            print(json.dumps(report))
        else:
            _print_matrix(table)
            owned = [q for q in table if q in best]
            print(f"own adapter best on {sum(best[q] for q in owned)} of {len(owned)} qtypes with an adapter")
            print(f"wrote {out / 'matrix.json'} and {out / 'matrix.png'}")
        return
    if record:
        from loraswap.adapters.manifest import write_manifest

        for e in chosen:
            q = e.manifest.qtype
            if q not in results or e.name not in results[q]:
                continue
            figures = {k: v for k, v in results[q][e.name].items() if k != "ppl"}
            base_figures = results[q].get(BASE, {})
            figures |= {f"base_{k}": v for k, v in base_figures.items() if k in ("nll", "rougeL")}
            figures |= {"heldout_n": len(heldout[q]), "quant": chosen_quant}
            write_manifest(e.path, e.manifest.model_copy(update={"metrics": figures}))
            print(f"recorded {e.name}'s figures on {q!r} in its manifest", file=sys.stderr)
    for q in qtypes:
        n = len(heldout[q])
        if as_json:
            keep = (*wanted, "nll_change", "nll_change_ci95")
            trimmed = {a: {m: r[m] for m in keep if m in r} for a, r in results[q].items()}
            print(json.dumps({"qtype": q, "n": n, "results": trimmed}))
            continue
        print(f"qtype {q!r}, {n} held-out questions")
        base_nll = results[q].get(BASE, {}).get("nll")
        for a, r in results[q].items():
            parts = [f"{k}={v}" for k, v in r.items()]
            if base_nll and a != BASE and "nll_change" in r:
                low, high = r["nll_change_ci95"]
                parts = [p for p in parts if not p.startswith("nll_change")]
                parts.append(f"nll vs base {r['nll_change']:+.1%} (95% interval {low:+.1%} to {high:+.1%})")
            print(f"  {a:24s} " + "  ".join(parts))


def own_best(table: dict[str, dict[str, float]], owners: dict[str, str | None]) -> dict[str, bool]:
    """For each qtype of the matrix that has an adapter of its own: is that adapter's NLL the lowest of the column?"""
    best: dict[str, bool] = {}
    for q, column in table.items():
        own = [a for a, owner in owners.items() if owner == q and a in column]
        if own:
            best[q] = min(column[a] for a in own) <= min(column.values())
    return best


def _print_matrix(table: dict[str, dict[str, float]]) -> None:
    qtypes = list(table)
    adapters = list(next(iter(table.values())))
    print(f"{'adapter':24s}" + "".join(f"{q[:14]:>16s}" for q in qtypes))
    for a in adapters:
        print(f"{a:24s}" + "".join(f"{table[q][a]:16.3f}" for q in qtypes))

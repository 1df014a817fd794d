"""The 4-bit CPU kernels side by side on shipped adapters' held-out answers: what each one costs in quality.

    python -m loraswap.bench.q4_kernels --data ../shared/data/medquad/medquad.csv.gz \\
        [--adapters symptoms,causes] [--questions 32] [--kernels bitsandbytes,float32,bfloat16,int8] [--out DIR]

For each adapter: the first `--questions` held-out questions of its qtype (the split its training used), the
embedded base in NF4 with the adapter through PEFT, and every 4-bit layer on each kernel in turn
(`fastpath.lean_4bit`: bitsandbytes' own, loraswap's float32, bf16 and int8-activation kernels). Per kernel: the
held-out answer NLL per token with the adapter and with the base (adapter disabled), and each one's relative
change against the first kernel's (bitsandbytes') on the same questions, with its paired-bootstrap 95% interval.
The int8 kernel rounds every layer's input to 8 bits per block of 64 (as llama.cpp does), the bf16 ones to bf16;
this shows what that does to the answers the server scores best on. Prints JSON; writes OUT/q4_kernels.json too.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any


def measure(data: str, adapter: str, questions: int, kernels: tuple[str, ...]) -> dict[str, Any]:
    """One adapter: NLL per kernel, adapter and base, and the changes against the first kernel's."""
    import torch
    from peft import PeftModel

    from loraswap.adapters.base import load_base
    from loraswap.adapters.store import AdapterStore
    from loraswap.server.worker import fastpath
    from loraswap.train.data import load_qa, split
    from loraswap.train.evaluate import answer_nll_items, change_figures
    from loraswap.train.stats import nll_of

    entry = AdapterStore.default(None).get(adapter)
    fraction = float(entry.manifest.training.get("heldout_fraction", 0.1))
    heldout = split(load_qa(data), entry.manifest.qtype or adapter, fraction).heldout[:questions]
    max_len = int(entry.manifest.training.get("max_seq_len", 256))
    base = load_base("embedded", quant="nf4")
    model = PeftModel.from_pretrained(base.model, str(entry.path)).eval()
    items: dict[str, dict[str, Any]] = {}
    result: dict[str, Any] = {"adapter": adapter, "questions": len(heldout), "kernels": {}}
    first = kernels[0]
    for kernel in kernels:
        _, used = fastpath.lean_4bit(model, kernel)  # type: ignore[arg-type]
        if used != kernel:
            result["kernels"][kernel] = {"skipped": f"not available here (layers on {used})"}
            continue
        with torch.no_grad():
            items[kernel] = {"adapter": answer_nll_items(model, base.tokenizer, heldout, max_len)}
            with model.disable_adapter():
                items[kernel]["base"] = answer_nll_items(model, base.tokenizer, heldout, max_len)
        figures: dict[str, Any] = {f"{who}_nll": round(nll_of(got), 4) for who, got in items[kernel].items()}
        for who, got in items[kernel].items():
            if kernel != first and first in items:
                change = change_figures(got, items[first][who])
                figures[f"{who}_vs_{first}"] = change["nll_change"]
                figures[f"{who}_vs_{first}_ci95"] = change["nll_change_ci95"]
        figures["adapter_vs_base"] = change_figures(items[kernel]["adapter"], items[kernel]["base"])["nll_change"]
        result["kernels"][kernel] = figures
        logging.getLogger(__name__).info("%s on %s: %s", adapter, kernel, figures)
    return result


def main(argv: list[str] | None = None) -> None:
    from loraswap.server.worker.fastpath import Q4_CHOICES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="MedQuAD as `loraswap train --data` takes it")
    ap.add_argument("--adapters", default="symptoms,causes", help="shipped adapters, comma-separated")
    ap.add_argument("--questions", type=int, default=32, help="held-out questions per adapter")
    ap.add_argument("--kernels", default=",".join(Q4_CHOICES), help="4-bit kernels; changes are against the first")
    ap.add_argument("--out", type=Path, default=None, help="also write q4_kernels.json here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    kernels = tuple(k.strip() for k in args.kernels.split(",") if k.strip())
    if not kernels or not set(kernels) <= set(Q4_CHOICES):
        raise SystemExit(f"--kernels takes some of {', '.join(Q4_CHOICES)}")
    names = [name.strip() for name in args.adapters.split(",") if name.strip()]
    results = [measure(args.data, name, args.questions, kernels) for name in names]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "q4_kernels.json").write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Does the soft route beat the hard one where the router is unsure? Answer NLL on held-out MedQuAD questions.

`"adapter": "auto"` (route "hard") serves the router's most likely qtype's adapter; `"route": "soft"` sums the
adapters of its most likely qtypes, weighted by their probabilities (`server/api/mixtures.py`). On held-out
questions whose top router probability is under a threshold, and whose soft route mixes at least two adapters, this
scores the reference answer's tokens (mean NLL per answer token, the prompt format and truncation of training)
under both, as two rows of one batch in the LoRA slots: the serving path's own arithmetic.

    python -m loraswap.bench.soft_route --data ../shared/data/medquad/medquad.csv.gz --questions 40
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m loraswap.bench.soft_route", description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="MedQuAD as CSV (qtype, Question, Answer), .csv or .csv.gz")
    ap.add_argument("--questions", type=int, default=40, help="held-out questions scored (the first that qualify)")
    ap.add_argument("--threshold", type=float, default=0.9, help="only questions whose top probability is below")
    ap.add_argument("--max-mix", type=int, default=4, help="adapters the soft route mixes at most")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "int8", "none"])
    ap.add_argument("--base", default="embedded")
    args = ap.parse_args(argv)

    import torch

    from loraswap.adapters.base import load_base
    from loraswap.adapters.prompt import build_example
    from loraswap.adapters.router import Router
    from loraswap.adapters.store import AdapterStore
    from loraswap.server.api.mixtures import soft_weights
    from loraswap.server.worker.slots import LoraSlots
    from loraswap.train.data import load_qa, split

    store = AdapterStore.default(None)
    base = load_base(args.base, quant=args.quant)
    model, tokenizer = base.model, base.tokenizer
    lora = {
        n: e
        for n, e in store.entries().items()
        if e.manifest.method == "lora" and e.manifest.base_fingerprint == base.ref.fingerprint
    }
    by_qtype: dict[str, str] = {}
    for name in sorted(lora):
        by_qtype.setdefault(str(lora[name].manifest.qtype), name)
    router_path = store.router_path()
    if router_path is None:
        raise SystemExit("no router installed (loraswap train-router)")
    router = Router.load(router_path)
    slots = LoraSlots(model, capacity=len(lora))
    for name, entry in lora.items():
        slots.load(name, entry.path)

    picked: list[tuple[Any, str | None, tuple[tuple[str, float], ...], float]] = []
    seen = unsure = 0
    for row in split(load_qa(args.data)).heldout:
        seen += 1
        ranked = router.ranked(row.question)
        if ranked[0][1] >= args.threshold:
            continue
        unsure += 1
        weights = soft_weights(ranked, by_qtype.get, args.max_mix)
        if len(weights) < 2:
            continue  # one adapter or none: the soft route is the hard one
        picked.append((row, by_qtype.get(ranked[0][0]), tuple((a, w) for _, a, w in weights), ranked[0][1]))
        if len(picked) == args.questions:
            break

    start = time.perf_counter()
    hard_nll, soft_nll = [], []
    for row, hard, mix, _ in picked:
        ex = build_example(tokenizer, row.question, row.answer, args.max_seq_len)
        if ex is None:
            continue
        ids = torch.tensor([ex.input_ids, ex.input_ids])
        labels = torch.tensor(ex.labels[1:])
        slots.use([hard, mix])  # hard (the top qtype's adapter, or the base) and soft, as two rows of one batch
        try:
            with torch.inference_mode():
                logits = model(input_ids=ids.to(base.device)).logits
        finally:
            slots.clear()
        losses = [
            float(torch.nn.functional.cross_entropy(logits[i, :-1].float().cpu(), labels, ignore_index=-100))
            for i in range(2)
        ]
        hard_nll.append(losses[0])
        soft_nll.append(losses[1])
    n = len(hard_nll)
    diffs = [s - h for h, s in zip(hard_nll, soft_nll, strict=True)]
    mean_diff = sum(diffs) / n if n else math.nan
    sd = math.sqrt(sum((d - mean_diff) ** 2 for d in diffs) / (n - 1)) if n > 1 else math.nan
    result = {
        "questions": n,
        "held_out_scanned": seen,
        "below_threshold": unsure,
        "threshold": args.threshold,
        "quant": args.quant,
        "hard_nll": round(sum(hard_nll) / n, 4) if n else None,
        "soft_nll": round(sum(soft_nll) / n, 4) if n else None,
        "soft_minus_hard": round(mean_diff, 4),
        "soft_minus_hard_stderr": round(sd / math.sqrt(n), 4) if n > 1 else None,
        "soft_better": sum(d < 0 for d in diffs),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

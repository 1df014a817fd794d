"""Held-out evaluation: answer-token NLL (and perplexity) and ROUGE-L of greedy answers.

The base and every adapter are scored on the same held-out questions of a qtype, with the same
prompt format and truncation as training. Adapters are loaded into one PeftModel and chosen by
name per call; the base is scored with the adapters disabled.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm

from loraswap.adapters.manifest import BASE
from loraswap.adapters.prompt import build_example, generation_eos, normalize_answer, prompt_ids, stop_token_ids
from loraswap.train.batching import PadCollator, is_seq2seq
from loraswap.train.data import QA
from loraswap.train.stats import Item, nll_change, nll_change_ci, nll_of

METRICS = ("nll", "rougeL")


def answer_nll_items(
    model: Any, tokenizer: Any, rows: Sequence[QA], max_seq_len: int = 256, batch_size: int = 4, desc: str | None = None
) -> list[Item]:
    """Each held-out answer's (sum of its tokens' NLL, token count); the prompt is not scored. Questions whose
    prompt leaves no room for an answer in max_seq_len are left out (the same ones for every adapter). On a
    seq2seq base: the decoder's NLL of the answer given the prompt in the encoder."""
    import torch

    seq2seq = is_seq2seq(model)
    examples = [e for e in (build_example(tokenizer, r.question, r.answer, max_seq_len, seq2seq) for r in rows) if e]
    if not examples:
        raise ValueError("no held-out example fits in max_seq_len")
    collate = PadCollator(tokenizer.pad_token_id, seq2seq=seq2seq)
    items: list[Item] = []
    device = next(model.parameters()).device
    for i in tqdm(range(0, len(examples), batch_size), desc=desc, disable=desc is None, leave=False):
        batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in examples[i : i + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        if seq2seq:  # the decoder's inputs are the labels shifted right; its position t predicts label t
            with torch.no_grad():
                logits = model(**batch).logits.float()
            labels = batch["labels"]
        else:
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # Prompt and P-tuning return logits for their virtual tokens too, in front: drop them.
            logits = logits[:, logits.size(1) - batch["input_ids"].size(1) :]
            # Position t predicts token t+1.
            logits = logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="none"
        ).view(labels.shape)
        counts = (labels != -100).sum(1)
        items.extend((float(s), int(n)) for s, n in zip(loss.sum(1), counts, strict=True))
    return items


def answer_nll(
    model: Any, tokenizer: Any, rows: Sequence[QA], max_seq_len: int = 256, batch_size: int = 4, desc: str | None = None
) -> float:
    """Mean negative log-likelihood per answer token over the held-out answers."""
    return nll_of(answer_nll_items(model, tokenizer, rows, max_seq_len, batch_size, desc))


def change_figures(adapter: Sequence[Item], base: Sequence[Item]) -> dict[str, Any]:
    """An adapter's NLL change against the base on the same questions, with its paired-bootstrap 95% interval."""
    low, high = nll_change_ci(adapter, base)
    return {"nll_change": round(nll_change(adapter, base), 4), "nll_change_ci95": [round(low, 4), round(high, 4)]}


def greedy_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    desc: str | None = None,
) -> list[str]:
    """Greedy answers, batched with left padding."""
    import torch

    device = next(model.parameters()).device
    out: list[str] = []
    stops = stop_token_ids(tokenizer, generation_eos(model))
    seq2seq = is_seq2seq(model)
    for i in tqdm(range(0, len(questions), batch_size), desc=desc, disable=desc is None, leave=False):
        chunk = [prompt_ids(tokenizer, q) for q in questions[i : i + batch_size]]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(chunk):
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )
        # A causal model returns prompt + answer; a seq2seq one the decoder's tokens alone, from its start token.
        start = 1 if seq2seq else width
        out.extend(tokenizer.decode(g[start:], skip_special_tokens=True).strip() for g in gen)
    return out


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (Google's rouge-score, with stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(normalize_answer(r), p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)
    ]
    return sum(scores) / len(scores)


@contextmanager
def using(model: Any, adapter: str) -> Iterator[Any]:
    """The model as `adapter` sees it (`__base__`: adapters disabled). For offline evaluation only:
    it switches model-wide state, which a server must never do per request."""
    if adapter == BASE:
        with model.disable_adapter():
            yield model
    else:
        model.set_adapter(adapter)
        yield model


def score(
    model: Any,
    tokenizer: Any,
    rows: Sequence[QA],
    metrics: Sequence[str],
    max_seq_len: int,
    max_new_tokens: int,
    label: str,
    items: list[Item] | None = None,
) -> dict[str, Any]:
    """The metrics of one model on one qtype's rows; `items` (if given) receives each answer's NLL figures."""
    result: dict[str, Any] = {}
    if "nll" in metrics:
        scored = answer_nll_items(model, tokenizer, rows, max_seq_len, desc=f"{label}: nll")
        if items is not None:
            items.extend(scored)
        nll = nll_of(scored)
        result["nll"] = round(nll, 4)
        result["ppl"] = round(math.exp(nll), 3)
    if "rougeL" in metrics:
        answers = greedy_answers(
            model, tokenizer, [r.question for r in rows], max_new_tokens, desc=f"{label}: generate"
        )
        result["rougeL"] = round(rouge_l(answers, [r.answer for r in rows]), 4)
    return result


def evaluate_adapters(
    base: Any,
    entries: Sequence[Any],
    rows_by_qtype: Mapping[str, Sequence[QA]],
    metrics: Sequence[str] = ("nll",),
    max_seq_len: int = 256,
    max_new_tokens: int = 128,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Scores {qtype: {adapter or __base__: {metric: value}}} for the base and every store entry. With the
    nll metric, each adapter also gets its nll_change against the base and that change's 95% interval.

    Each adapter is checked against the base first (fingerprint and prompt format); LoRA adapters
    share one PeftModel, each prompt-learning adapter gets its own wrapper of the same base.
    """
    from peft import PeftModel

    from loraswap.adapters.validate import check_compatible

    for e in entries:
        check_compatible(e.manifest, base.ref)
    tok = base.tokenizer
    results: dict[str, dict[str, dict[str, Any]]] = {q: {} for q in rows_by_qtype}
    items: dict[tuple[str, str], list[Item]] = {}

    def run(model: Any, label: str) -> None:
        model.eval()
        for q, rows in rows_by_qtype.items():
            got = items.setdefault((q, label), [])
            results[q][label] = score(model, tok, rows, metrics, max_seq_len, max_new_tokens, f"{label} on {q}", got)

    for e in [e for e in entries if e.manifest.method != "lora"]:
        run(PeftModel.from_pretrained(base.model, str(e.path), adapter_name=e.name), e.name)
    lora = [e for e in entries if e.manifest.method == "lora"]
    if not lora:
        run(base.model, BASE)
    else:
        model = PeftModel.from_pretrained(base.model, str(lora[0].path), adapter_name=lora[0].name)
        for e in lora[1:]:
            model.load_adapter(str(e.path), adapter_name=e.name)
        for label in [BASE] + [e.name for e in lora]:
            with using(model, label) as m:
                run(m, label)
    if "nll" in metrics:
        for q, res in results.items():
            for label in res:
                if label != BASE and (q, BASE) in items:
                    res[label].update(change_figures(items[(q, label)], items[(q, BASE)]))
    return results


def plot_matrix(matrix: dict[str, dict[str, float]], path: Any, title: str) -> None:
    """Heatmap of NLL, adapters (rows) x qtypes (columns); the best row of each column is boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    qtypes = list(matrix)
    adapters = list(next(iter(matrix.values())))
    values = [[matrix[q][a] for q in qtypes] for a in adapters]
    fig, ax = plt.subplots(figsize=(1.3 * len(qtypes) + 2.5, 0.55 * len(adapters) + 1.8))
    im = ax.imshow(values, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(qtypes)), qtypes, rotation=30, ha="right")
    ax.set_yticks(range(len(adapters)), adapters)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(
                j, i, f"{v:.2f}", ha="center", va="center", color="w" if v > sum(row) / len(row) else "k", fontsize=8
            )
    for j in range(len(qtypes)):
        best = min(range(len(adapters)), key=lambda i: values[i][j])
        ax.add_patch(Rectangle((j - 0.5, best - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    ax.set_xlabel("held-out questions of qtype")
    ax.set_ylabel("adapter")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="answer NLL (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Training throughput: loraswap's recipe against the plain Trainer + PEFT QLoRA recipe.

Both train the same LoRA (r=8, alpha=32, q_proj/v_proj) on the same tokenized rows with the same
batch size and the same HF Trainer. The plain recipe is the textbook one: `prepare_model_for_kbit_training`
with its default gradient checkpointing, random batches padded to their longest member. loraswap's
differs in two places: length-grouped batches, and no gradient checkpointing. Runs alternate
(plain, loraswap, plain, loraswap, ...) so that machine noise hits both alike; tokens/s counts real
(non-padding) tokens.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from loraswap.adapters.base import Quant, load_base, load_tokenizer, resolve_base
from loraswap.train.batching import pick_rows, tokenize_rows
from loraswap.train.data import load_qa, split
from loraswap.train.trainer import TrainConfig, attach_adapter, run_trainer


def compare(
    base: str, data: str, qtype: str, steps: int, rounds: int, quant: Quant = "nf4", double_quant: bool = True
) -> dict[str, Any]:
    ref = resolve_base(base)
    rows = split(load_qa(data), qtype).train
    tokenizer = load_tokenizer(ref)
    examples = tokenize_rows(pick_rows(rows, 512, 0), tokenizer, 256, seq2seq=ref.kind == "seq2seq")
    common = {"max_steps": steps, "quant": quant, "double_quant": double_quant, "save_steps": 10**6, "eval_examples": 0}
    variants = {
        "plain": TrainConfig(bucketing=False, gradient_checkpointing=True, **common),  # type: ignore[arg-type]
        "loraswap": TrainConfig(**common),  # type: ignore[arg-type]
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    padding: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, cfg in variants.items():
            loaded = load_base(ref, quant=quant, double_quant=double_quant)
            model = attach_adapter(loaded, cfg)
            with tempfile.TemporaryDirectory() as tmp:
                _, seconds, collated = run_trainer(
                    model, examples, cfg, Path(tmp), tokenizer.pad_token_id, resume=False, progress=False
                )
            rates[name].append(collated.tokens / seconds)
            padding[name].append(1 - collated.tokens / collated.slots)
            print(f"{name}: {collated.tokens / seconds:.1f} tokens/s, {padding[name][-1]:.0%} padding", flush=True)
    plain, ours = statistics.median(rates["plain"]), statistics.median(rates["loraswap"])
    return {
        "quant": quant,
        "steps": steps,
        "rounds": rounds,
        "plain_tokens_per_s": round(plain, 1),
        "loraswap_tokens_per_s": round(ours, 1),
        "ratio": round(ours / plain, 2),
        "plain_padding": round(statistics.mean(padding["plain"]), 3),
        "loraswap_padding": round(statistics.mean(padding["loraswap"]), 3),
    }

"""Examples and batches for training and held-out scoring: tokenized rows, a deterministic subset, and the
collator that pads a batch (the loss is taken on answer tokens only: padding and, for causal bases, the prompt
carry the label -100)."""

from __future__ import annotations

import math
from typing import Any

from loraswap.adapters.prompt import Example, build_example
from loraswap.train.data import QA


def tokenize_rows(rows: list[QA], tokenizer: Any, max_seq_len: int, seq2seq: bool = False) -> list[Example]:
    examples = (build_example(tokenizer, r.question, r.answer, max_seq_len, seq2seq) for r in rows)
    return [e for e in examples if e is not None]


def pick_rows(rows: list[QA], limit: int | None, seed: int) -> list[QA]:
    """A deterministic subset that does not depend on file order beyond the seed."""
    if limit is None or limit >= len(rows):
        return rows
    import random

    return random.Random(seed).sample(rows, limit)


class PadCollator:
    """Pads a batch to its longest member; labels padded with -100 so padding carries no loss. For a seq2seq
    base the labels (the decoder's targets) are padded to their own longest; the model makes the decoder's
    inputs from them (shifted right, from the start token)."""

    def __init__(self, pad_id: int, multiple_of: int = 8, seq2seq: bool = False) -> None:
        self.pad_id = pad_id
        self.multiple_of = multiple_of
        self.seq2seq = seq2seq
        self.tokens = 0
        """Real (non-padding) tokens collated so far."""
        self.slots = 0
        """Token slots collated so far, padding included."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        def width(key: str) -> int:
            return math.ceil(max(len(f[key]) for f in features) / self.multiple_of) * self.multiple_of

        ids = torch.full((len(features), width("input_ids")), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width("labels" if self.seq2seq else "input_ids")), -100, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, : len(f["labels"])] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        self.tokens += int(mask.sum())
        self.slots += mask.numel()
        if self.seq2seq:  # the decoder's tokens count too
            self.tokens += int((labels != -100).sum())
            self.slots += labels.numel()
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def is_seq2seq(model: Any) -> bool:
    """Whether `model` (a base or a PeftModel over one) is an encoder-decoder."""
    return bool(getattr(model.config, "is_encoder_decoder", False))

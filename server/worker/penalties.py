"""OpenAI's `presence_penalty`, `frequency_penalty` and `logit_bias`, applied per row to the logits a step's tokens
are chosen from (each row's own values: a batch mixes rows with and without them).

As OpenAI defines them: a token's logit is lowered by `presence_penalty` once it occurs in the row's generated
tokens, and by `frequency_penalty` times the number of times it occurs there (the prompt does not count); a biased
token's logit gets its bias added (-100 bans a token, 100 all but forces it). Log-probabilities are reported from
the model's own logits, before these (`logprobs.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraswap.server.worker.batch import Row


def _adjusts(row: Row) -> bool:
    r = row.req
    return bool(r.presence_penalty or r.frequency_penalty or r.logit_bias)


def adjust(rows: Sequence[Row], logits: torch.Tensor) -> torch.Tensor:
    """`logits` [rows, vocabulary] with each row's penalties and biases applied (a new tensor where any row has
    some; `logits` itself, untouched, where none has)."""
    which = [i for i, r in enumerate(rows) if _adjusts(r)]
    if not which:
        return logits
    out = logits.float().clone()
    vocabulary = out.shape[-1]
    for i in which:
        r = rows[i].req
        generated = rows[i].generated
        if generated and (r.presence_penalty or r.frequency_penalty):
            counts = torch.bincount(torch.tensor(generated, device=out.device), minlength=vocabulary)[:vocabulary]
            out[i] -= r.frequency_penalty * counts + r.presence_penalty * (counts > 0)
        if r.logit_bias:
            ids = torch.tensor([t for t, _ in r.logit_bias], device=out.device)
            out[i, ids] += torch.tensor([b for _, b in r.logit_bias], device=out.device, dtype=out.dtype)
    return out

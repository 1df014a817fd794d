"""Choosing each row's next token, and turning a row's tokens into the text its next event carries.

Greedy rows take the argmax of their logits (the engine takes every row's in one kernel); rows with a temperature
draw from their own seeded generator, so a seed gives the same answer whatever else runs in the batch. Text is
decoded from all of a row's tokens at each step and sent as the part not sent yet, holding back what could still
change: an incomplete UTF-8 character, or a tail that could be the start of a stop string.
"""

from __future__ import annotations

from typing import Any

import torch

from loraswap.server.jobs import Job
from loraswap.server.worker.batch import Row


def generator_for(job: Job) -> torch.Generator | None:
    """The random generator of a sampling job (seeded with its seed, or from its uid), None for a greedy one."""
    if job.temperature <= 0:
        return None
    gen = torch.Generator(device="cpu")
    seed = job.seed if job.seed is not None else int.from_bytes(job.uid.encode()[:8], "big")
    gen.manual_seed(seed % 2**64)
    return gen


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """A token drawn from `logits` ([vocabulary]) at `temperature`, from the smallest set of most likely tokens
    whose probabilities reach `top_p`."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def new_text(tokenizer: Any, row: Row, final: bool) -> tuple[str, bool]:
    """Text decoded since the last event, and whether it hit a stop string. Held back (unless `final`): an
    incomplete UTF-8 character, and a tail that could be the start of a stop string. A stop string ends the text
    before it."""
    full: str = tokenizer.decode(row.generated, skip_special_tokens=True)
    for s in row.req.stop:
        at = full.find(s, max(0, row.emitted - len(s)))
        if at != -1:
            text = full[row.emitted : at] if at > row.emitted else ""
            row.emitted = max(row.emitted, at)
            return text, True
    end = len(full)
    if not final:
        if full.endswith("\ufffd"):
            end = len(full.rstrip("\ufffd"))
        for s in row.req.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if full[:end].endswith(s[:k]):
                    end -= k
                    break
    end = max(end, row.emitted)
    text = full[row.emitted : end]
    row.emitted = end
    return text, False

"""Log-probabilities of the tokens a row generates, and of its prompt's tokens (completions' `echo`), computed in
the worker from the same forward passes that generate: a scored row runs in the batch beside every other row, with
its own adapter.

Values are the model's own distribution (log-softmax of the logits, before temperature and top_p), as vLLM returns
them; each comes with the most likely tokens at its position. A prompt token's value is conditioned on the tokens
before it, so the first has none. Where the output projection runs in bfloat16 on a CPU (`fastpath.bf16_head`), the
top few logits of a position are exact and the rest carry bf16 rounding.

The engine calls in at three places: `logits_to_keep` (a prefill keeps the logits of every prompt position a scored
row needs, not only the last), `score_prompts` (after a prefill) and `scored` (around choosing the next tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from loraswap.server.jobs import JobEvent, TokenLogprob
from loraswap.server.worker import penalties
from loraswap.server.worker.batch import Row

CHUNK = 256
"""Prompt positions whose log-softmax is computed at once."""
FLOOR = -9999.0
"""Log-probabilities are clamped here: JSON has no -infinity (vLLM clamps the same)."""


def scores_prompt(row: Row) -> bool:
    """Whether the row's prompt is to be scored (then its whole prompt is computed: none of it from the prefix
    cache, whose blocks hold keys and values, not logits)."""
    return row.req.prompt_logprobs is not None


def logits_to_keep(rows: Sequence[Row], default: dict[str, Any]) -> dict[str, Any]:
    """The prefill's `logits_to_keep` argument: `default` (the last position only), or enough trailing positions
    for the longest prompt that is scored. Prompts end at the last column (left padding), so the last k positions
    cover every scored prompt of at most k tokens."""
    longest = max((len(r.req.prompt_ids) for r in rows if scores_prompt(r)), default=0)
    if not longest or not default:  # nothing scored, or a model that returns every position anyway
        return default
    return {"logits_to_keep": longest}


def _entries(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprob]:
    """`logprobs` [positions, vocabulary] -> one entry per position for the token `chosen` [positions] there, with
    the `k` most likely tokens."""
    picked = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).clamp(min=FLOOR).tolist()
    if k > 0:
        top_lp, top_ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        top_values = top_lp.clamp(min=FLOOR).tolist()
        tops = [list(zip(i, lp, strict=True)) for i, lp in zip(top_ids.tolist(), top_values, strict=True)]
    else:
        tops = [[] for _ in picked]
    ids = chosen.tolist()
    return [
        {"id": int(t), "logprob": float(lp), "top": [[int(a), float(b)] for a, b in top]}
        for t, lp, top in zip(ids, picked, tops, strict=True)
    ]


def score_prompts(rows: Sequence[Row], logits: torch.Tensor) -> None:
    """After a prefill: each scored row's prompt log-probabilities, kept on the row for its first event.
    `logits` [rows, positions, vocabulary], right-aligned with the prompts (`logits_to_keep`); position j predicts
    the token after it, so prompt token t is scored by the position of token t - 1."""
    width = logits.shape[1]
    for i, r in enumerate(rows):
        if not scores_prompt(r):
            continue
        prompt = r.req.prompt_ids
        n = len(prompt)
        r.prompt_logprobs = [None]
        for start in range(1, n, CHUNK):  # a chunk of positions at a time: a long prompt's log-softmax stays small
            end = min(n, start + CHUNK)
            lp = torch.log_softmax(logits[i, width - n + start - 1 : width - n + end - 1].float(), dim=-1)
            chosen = torch.tensor(prompt[start:end], dtype=torch.long, device=lp.device)
            r.prompt_logprobs += _entries(lp, chosen, int(r.req.prompt_logprobs or 0))


def scored(
    rows: list[Row], logits: torch.Tensor, choose: Callable[[list[Row], torch.Tensor], list[JobEvent]]
) -> list[JobEvent]:
    """`choose(rows, logits)` (the engine's sampling and events; the logits with each row's penalties and biases,
    `penalties.py`), with the log-probabilities rows asked for put on
    their events: each chosen token's, and on a row's first event its prompt's. Tokens whose text is held back keep
    theirs until the event that carries it."""
    want = [i for i, r in enumerate(rows) if r.req.logprobs is not None]
    lp = torch.log_softmax(logits[want].float(), dim=-1) if want else None  # before anything changes the logits
    before = [len(rows[i].generated) for i in want]
    events = choose(rows, penalties.adjust(rows, logits))
    if lp is not None:
        # Every row chose a token (`Row.next_token`); one that was not added to the text ended the row: a stop token
        # (marked "end": chat leaves it out; completions report it, as vLLM does, so a scored continuation's last
        # token is never lost).
        chosen = torch.tensor([rows[i].next_token for i in want], dtype=torch.long, device=lp.device)
        k = max(int(rows[i].req.logprobs or 0) for i in want)
        for j, entry in enumerate(_entries(lp, chosen, k)):
            row = rows[want[j]]
            entry["top"] = entry["top"][: int(row.req.logprobs or 0)]
            if len(row.generated) == before[j]:
                entry["end"] = True
            row.logprobs.append(entry)
    by_uid = {r.req.uid: r for r in rows if r.req.logprobs is not None or r.prompt_logprobs is not None}
    if not by_uid:
        return events
    out = []
    for ev in events:
        owner = by_uid.get(ev.uid)
        if owner is not None:
            extra: dict[str, Any] = {}
            if owner.req.logprobs is not None:
                extra["logprobs"], owner.logprobs = owner.logprobs, []
            if owner.prompt_logprobs is not None:
                extra["prompt_logprobs"], owner.prompt_logprobs = owner.prompt_logprobs, None
            ev = JobEvent(**{**ev.__dict__, **extra})
        out.append(ev)
    return out

"""Requests joining a running batch in the batch's own decoding forward, and the prompt blocks a prefill hands
to the prefix cache.

Without this, a step that admits requests runs two forwards: the joining prompts' prefill, then the decoding step of
every row, the new ones included; their first tokens go out after both. One forward can do both, as vLLM's chunked
prefill and SARATHI do: the new rows join the batch with their cached keys and values (the prompts' leading blocks
from the prefix cache), and the step's input is each running row's next token beside each new row's remaining prompt
tokens, left-padded to the longest; each row's last position gives its next token (a new row's first). The running
rows' padding columns stay in the cache, masked, until they leave.

The padding is the price: each running row computes as many columns as the longest new prompt, all but one of them
padding. So a join rides in the decoding step only where that padding is no more than the rows the separate
decoding step would have computed (every row, the new ones included): a wave of requests joining a few running ones
does, one request joining a full batch does not. Rows that change their inputs or their cache (prompt, P- and
prefix-tuning adapters), prompts that are scored (echo), prompts with nothing cached, and steps in which short
requests run alone take the two forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from loraswap.server.jobs import JobEvent
from loraswap.server.worker import logprobs
from loraswap.server.worker.batch import Row
from loraswap.server.worker.kvcache import past_cache
from loraswap.server.worker.prefix import KV, PrefixCache


def fits(engine: Any, new: Sequence[Row], todo: Sequence[Sequence[int]], pasts: Sequence[KV | None]) -> bool:
    """Whether `new` (their prompt tokens still to compute: `todo`; their cached keys and values: `pasts`) may join
    in the running rows' decoding step of `engine` (an `engine.Engine`, which imports this module)."""
    if not engine.join_in_step or not engine.batch.rows or engine.prompt_cache is None:
        return False
    running = len(engine.batch.rows)
    if not any(p is not None for p in pasts) or running * (max(len(t) for t in todo) - 1) > running + len(new):
        return False
    if engine.front_alone():
        return False  # this step runs the short rows alone
    residency = engine.residency
    return not any(
        r.key in residency.virtual or r.key in residency.prefixes or logprobs.scores_prompt(r) or not t
        for r, t in zip(new, todo, strict=True)
    )


def join_and_decode(
    engine: Any, new: list[Row], todo: Sequence[Sequence[int]], pasts: Sequence[KV | None], cacheable: list[bool]
) -> list[JobEvent]:
    """One forward over the running rows' next tokens and `new`'s remaining prompt tokens (`fits` said it may)."""
    batch = engine.batch
    cache, past_mask, sizes = past_cache(engine.base_model.config, list(pasts))
    for r, n in zip(new, sizes, strict=True):
        r.real_len = n
    running = len(batch.rows)
    batch.join(new, cache, past_mask)  # below the running rows, their cached tokens right-aligned
    rows = batch.rows
    width = max(len(t) for t in todo)
    ids = torch.full((len(rows), width), int(engine.tokenizer.pad_token_id), dtype=torch.long)
    columns = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens = [r.next_token] if i < running else list(todo[i - running])
        n = len(tokens)
        ids[i, width - n :] = torch.tensor(tokens)
        columns[i, width - n :] = 1
        positions[i, width - n :] = torch.arange(r.real_len, r.real_len + n)
        r.real_len += n
    assert batch.mask is not None
    batch.mask = torch.cat([batch.mask, columns], dim=1)
    engine.held = 0
    out = engine.residency.forward(
        input_ids=ids.to(engine.device),
        attention_mask=batch.mask.to(engine.device),
        position_ids=positions.to(engine.device),
        past_key_values=batch.cache,
        adapter_names=[engine.residency.lora_name(r.key) for r in rows],
        running=True,
        **engine.last_logits_only,
    )
    batch.cache = out.past_key_values
    if engine.prompt_cache is not None:
        keep_blocks(engine.prompt_cache, new, cacheable, batch.cache, batch.mask.shape[1], first_row=running)
    events = engine._sample_and_emit(rows, out.logits[:, -1, :])
    engine._arrange()
    return events


def keep_blocks(
    prompt_cache: PrefixCache, rows: Sequence[Row], cacheable: Sequence[bool], cache: Any, columns: int, first_row: int
) -> None:
    """Hand the prefix cache the keys and values a forward computed for `rows`' leading prompt blocks; `rows` are
    the cache's rows from `first_row` on. Each row's prompt ends at the last cache column, and the tokens it computed
    are contiguous there: its token t sits `len(prompt) - t` columns before the end."""
    for i, r in enumerate(rows):
        if not cacheable[i]:
            continue
        n, row = len(r.req.prompt_ids), first_row + i

        def kv(t0: int, t1: int, row: int = row, n: int = n) -> KV:
            c0, c1 = columns - (n - t0), columns - (n - t1)
            keys = torch.stack([layer.keys[row, :, c0:c1] for layer in cache.layers])
            values = torch.stack([layer.values[row, :, c0:c1] for layer in cache.layers])
            return keys, values

        prompt_cache.store(r.key, r.req.prompt_ids, r.cached, kv)

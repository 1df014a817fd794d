"""Continuous batching for encoder-decoder (seq2seq, T5) bases: the `Engine` interface, other caches.

A request's prompt goes through the encoder once, when it is admitted; its answer comes from the
decoder, one token per step, batched with every other running request:
- admission runs the encoder and the first decoder step of the new rows in one forward (each row with
  its own adapter, as in `engine.py`), and keeps, per row, the encoder's output and the decoder's
  caches: self-attention keys and values (one column per answer token so far) and cross-attention keys
  and values (the encoder output projected once by each decoder layer, with the row's adapter, since
  LoRA on T5's `v` adapts the cross-attention's values too);
- every step runs one decoder forward over all running rows.
Rows of different prompt lengths sit side by side left-padded, with an encoder mask; rows that joined
at different steps have decoder caches of different lengths, left-padded with a decoder mask. T5's
position information is a bias on the relative distance between query and key, which left padding
does not change, so a row's tokens equal what it would get alone (the tests check it against PEFT).

Scheduling, adapter loading, sampling, stop strings and events are `Engine`'s own; the running rows' caches are a
`Seq2SeqBatch`. Not served on these bases: prompt-learning adapters (refused on upload, `adapters/validate.py`) and
prefix caching (the encoder runs once per request; the decoder has no shared prefix to reuse).
"""

from __future__ import annotations

from typing import Any

import torch

from loraswap.adapters.store import StoreEntry
from loraswap.server.jobs import JobEvent
from loraswap.server.worker.batch import Batch, Row
from loraswap.server.worker.engine import Engine
from loraswap.server.worker.prefix import KV
from loraswap.server.worker.residency import Residency


class Seq2SeqResidency(Residency):
    """LoRA adapters only."""

    def load_virtual_tokens(self, entry: StoreEntry) -> torch.Tensor:
        raise ValueError(f"adapter {entry.name!r} is a prompt-learning adapter; seq2seq bases serve LoRA only")

    def load_prefix(self, entry: StoreEntry) -> KV:
        raise ValueError(f"adapter {entry.name!r} is a prefix-tuning adapter; seq2seq bases serve LoRA only")


class Seq2SeqBatch(Batch):
    """The running rows with the encoder's output beside the decoder's caches (self-attention: `mask`, one column
    per answer token so far; cross-attention: `encoder_mask`, one per prompt token)."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        super().__init__(device, capacity)
        self.encoded: torch.Tensor | None = None  # [rows, encoder columns, d_model], the encoder's output
        self.encoder_mask: torch.Tensor | None = None  # [rows, encoder columns], 1 on a prompt token

    def join_encoded(
        self, rows: list[Row], cache: Any, encoded: torch.Tensor, encoder_mask: torch.Tensor, mask: torch.Tensor
    ) -> None:
        """Add the new rows' caches below the running rows', each kind left-padded to the common width."""
        if self.cache is None or not self.rows:
            self.cache, self.encoded, self.encoder_mask, self.mask = cache, encoded, encoder_mask, mask
            self.rows += rows
            return
        assert self.mask is not None and self.encoded is not None and self.encoder_mask is not None
        dec = max(self.mask.shape[1], mask.shape[1])
        enc = max(self.encoder_mask.shape[1], encoder_mask.shape[1])
        for layers, new_layers, width in (
            (self.cache.self_attention_cache.layers, cache.self_attention_cache.layers, dec),
            (self.cache.cross_attention_cache.layers, cache.cross_attention_cache.layers, enc),
        ):
            for old, add in zip(layers, new_layers, strict=True):
                old.keys = torch.cat([_pad_left(old.keys, width, 2), _pad_left(add.keys, width, 2)])
                old.values = torch.cat([_pad_left(old.values, width, 2), _pad_left(add.values, width, 2)])
        self.encoded = torch.cat([_pad_left(self.encoded, enc, 1), _pad_left(encoded, enc, 1)])
        self.encoder_mask = torch.cat([_pad_left(self.encoder_mask, enc, 1), _pad_left(encoder_mask, enc, 1)])
        self.mask = torch.cat([_pad_left(self.mask, dec, 1), _pad_left(mask, dec, 1)])
        self.rows += rows

    def retire(self, finished: list[Row]) -> None:
        index = self.drop(finished)
        if index is None:
            return
        assert self.mask is not None and self.encoded is not None and self.encoder_mask is not None
        # Columns that are padding in every remaining row are dropped, on both sides.
        self.mask = self.mask[index]
        dec0 = int(self.mask.any(dim=0).long().argmax())
        self.mask = self.mask[:, dec0:]
        self.encoder_mask = self.encoder_mask[index]
        enc0 = int(self.encoder_mask.any(dim=0).long().argmax())
        self.encoder_mask = self.encoder_mask[:, enc0:]
        dev_index = index.to(self.device)
        self.encoded = self.encoded.index_select(0, dev_index)[:, enc0:]
        for layers, first in (
            (self.cache.self_attention_cache.layers, dec0),
            (self.cache.cross_attention_cache.layers, enc0),
        ):
            for layer in layers:
                layer.keys = layer.keys.index_select(0, dev_index)[:, :, first:]
                layer.values = layer.values.index_select(0, dev_index)[:, :, first:]

    def clear(self) -> None:
        super().clear()
        self.encoded = self.encoder_mask = None


class Seq2SeqEngine(Engine):
    batch_class = Seq2SeqBatch
    residency_class = Seq2SeqResidency
    batch: Seq2SeqBatch

    def __init__(self, model: Any, tokenizer: Any, resolve: Any, **kwargs: Any) -> None:
        """As `Engine`; `prefix_cache_bytes` and `short_first_steps` are ignored (no prefix caching on encoder-decoder
        bases, and every step runs every row)."""
        kwargs["prefix_cache_bytes"] = 0
        kwargs["short_first_steps"] = 0
        super().__init__(model, tokenizer, resolve, **kwargs)
        start = getattr(model.config, "decoder_start_token_id", None)
        self.start_id = int(start if start is not None else tokenizer.pad_token_id)

    def _prefill(self, new: list[Row]) -> list[JobEvent]:
        """Encode the new prompts (left-padded) and take the first decoder step from the start token."""
        width = max(len(r.req.prompt_ids) for r in new)
        ids = torch.full((len(new), width), int(self.tokenizer.pad_token_id), dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, r in enumerate(new):
            n = len(r.req.prompt_ids)
            ids[i, width - n :] = torch.tensor(r.req.prompt_ids)
            mask[i, width - n :] = 1
            r.real_len = 1  # decoder tokens in the cache: the start token
        out = self.residency.forward(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            decoder_input_ids=torch.full((len(new), 1), self.start_id, dtype=torch.long, device=self.device),
            adapter_names=[self.residency.lora_name(r.key) for r in new],
        )
        first = torch.ones((len(new), 1), dtype=torch.long)
        self.batch.join_encoded(new, out.past_key_values, out.encoder_last_hidden_state, mask, first)
        return self._sample_and_emit(new, out.logits[:, -1, :])

    def _decode(self) -> list[JobEvent]:
        batch = self.batch
        assert batch.mask is not None and batch.encoded is not None and batch.encoder_mask is not None
        ids = torch.tensor([[r.next_token] for r in batch.rows], dtype=torch.long)
        batch.mask = torch.cat([batch.mask, torch.ones((len(batch.rows), 1), dtype=torch.long)], dim=1)
        for r in batch.rows:
            r.real_len += 1
        out = self.residency.forward(
            decoder_input_ids=ids.to(self.device),
            decoder_attention_mask=batch.mask.to(self.device),
            encoder_outputs=(batch.encoded,),
            attention_mask=batch.encoder_mask.to(self.device),
            past_key_values=batch.cache,
            adapter_names=[self.residency.lora_name(r.key) for r in batch.rows],
        )
        batch.cache = out.past_key_values
        return self._sample_and_emit(list(batch.rows), out.logits[:, -1, :])


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`t` with zeros in front along `dim` up to `width` (masked out, never attended)."""
    pad = width - t.shape[dim]
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t.new_zeros(shape), t], dim=dim)

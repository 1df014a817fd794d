"""Grammar-constrained rows: a job's output held to a JSON Schema, token by token, beside free rows in one batch.

A constrained job (`Job.grammar`: {"schema", "strict"}, or {"structural_tag"}: free text in which calls written
between tags follow a schema) is compiled by xgrammar (the library vLLM and SGLang use;
its compiler caches compiled schemas) into a grammar, and its row gets a `GrammarMatcher`. Each step, before a token
is chosen, every constrained row's logits are masked to the tokens its matcher allows (a bitmask of the vocabulary
filled per row, applied in place: disallowed tokens get -inf), so greedy and sampled rows both pick an allowed
token; the chosen token then advances the row's matcher. Free rows are left as they are. The end-of-answer token is
allowed only where the JSON is complete, so an answer that stops on its own always parses and validates; one cut by
max_tokens ends with finish_reason "length", as OpenAI's does.

JSON is generated compact (`any_whitespace=False`): no whitespace between tokens of the JSON syntax, so a small
model cannot loop on newlines, and xgrammar's JSON strings admit no raw control characters (they must be escaped),
so nothing in the text breaks a JSON parser.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

import torch

from loraswap.server.jobs import Job
from loraswap.server.worker.failures import InvalidJob

log = logging.getLogger(__name__)


class Grammars:
    """The worker's grammar compiler (made on the first constrained job) and the per-row masking."""

    def __init__(self, tokenizer: Any, stop_ids: Iterable[int], vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = sorted(stop_ids)
        self.vocab_size = vocab_size
        self._compiler: Any = None

    def _compile(self, spec: dict[str, Any]) -> Any:
        import xgrammar as xgr

        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids
            )
            self._compiler = xgr.GrammarCompiler(info)
        if "structural_tag" in spec:  # free text with calls in tags (tool_choice "auto")
            return self._compiler.compile_structural_tag(json.dumps(spec["structural_tag"]))
        return self._compiler.compile_json_schema(
            json.dumps(spec["schema"]), any_whitespace=False, strict_mode=bool(spec.get("strict", True))
        )

    def start(self, job: Job) -> Any:
        """The matcher of a constrained job's row (None for a free one); InvalidJob if its schema does not compile."""
        if job.grammar is None:
            return None
        import xgrammar as xgr

        try:
            spec = json.loads(job.grammar)
            return xgr.GrammarMatcher(self._compile(spec))
        except (ValueError, RuntimeError, TypeError, KeyError) as e:
            detail = str(e).strip().splitlines()
            raise InvalidJob(f"the schema cannot be compiled to a grammar: {detail[-1] if detail else e}") from None

    def mask(self, rows: list[Any], logits: torch.Tensor) -> None:
        """Set to -inf, in place, each constrained row's logits ([rows, vocabulary], float32, CPU) of tokens its
        grammar does not allow next."""
        constrained = [i for i, r in enumerate(rows) if r.matcher is not None]
        if not constrained:
            return
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(len(rows), logits.shape[-1])
        for i in constrained:
            rows[i].matcher.fill_next_token_bitmask(bitmask, i)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1], indices=constrained)

    @staticmethod
    def accept(row: Any, token: int) -> None:
        """Advance a constrained row's matcher by the token chosen for it (one its mask allowed)."""
        if row.matcher is not None and not row.matcher.is_terminated() and not row.matcher.accept_token(token):
            log.error("token %s is outside the grammar of request %s", token, row.req.uid)  # never: it was masked

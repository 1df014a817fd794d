"""The workers' token log-probabilities (`jobs.TokenLogprob`, token ids) in OpenAI's two shapes: the legacy
completions' `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` and chat's `{"content": [{"token",
"logprob", "bytes", "top_logprobs"}]}`.

A token's text is the base tokenizer's decoding of that token alone (as vLLM reports it); a token that holds part of
a UTF-8 character decodes to U+FFFD. Offsets count characters of those texts, from where the choice's text starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loraswap.server.jobs import TokenLogprob


class TokenText:
    """Token id -> its text, from the base's tokenizer, remembered (decoding one token is read-only: safe beside
    the tokenizing thread)."""

    def __init__(self, tokenizer: Any, as_ids: bool = False) -> None:
        """`as_ids`: label tokens "token_id:N" in logprobs (vLLM's `return_tokens_as_token_ids`), so a client can
        send exactly those tokens back (a text re-tokenized may split differently)."""
        self.tokenizer = tokenizer
        self.as_ids = as_ids
        self._seen: dict[int, str] = {}

    def label(self, token: int) -> str:
        return f"token_id:{token}" if self.as_ids else self(token)

    def __call__(self, token: int) -> str:
        text = self._seen.get(token)
        if text is None:
            text = str(self.tokenizer.decode([token]))
            if len(self._seen) < 1 << 18:
                self._seen[token] = text
        return text


class CompletionLogprobs:
    """One choice's completions-shaped log-probabilities, grown event by event; `take()` returns what was added
    since the last take (a streamed chunk's), `offset` is where the next token's text starts."""

    def __init__(self, text: TokenText, offset: int = 0) -> None:
        self.text = text
        self.offset = offset
        self._new: dict[str, list[Any]] = _empty()

    def add(self, entries: Sequence[TokenLogprob | None]) -> None:
        for e in entries:
            if e is None:  # the prompt's first token: nothing before it to condition on
                continue
            token = self.text.label(e["id"])
            # The chosen token is always in its position's dict (vLLM's shape), with its own value even where
            # another token has the same text (as parts of one UTF-8 character do).
            top = {token: e["logprob"]}
            for t, lp in e["top"]:
                top.setdefault(self.text.label(t), lp)
            self._new["tokens"].append(token)
            self._new["token_logprobs"].append(e["logprob"])
            self._new["top_logprobs"].append(top)
            self._new["text_offset"].append(self.offset)
            self.offset += 0 if e.get("end") else len(self.text(e["id"]))  # a stop token adds no text

    def add_first(self, first: int) -> None:
        """The prompt's first token (echo): its text, with no log-probability (None, as vLLM's)."""
        for key, value in (("tokens", self.text.label(first)), ("token_logprobs", None), ("top_logprobs", None)):
            self._new[key].append(value)
        self._new["text_offset"].append(self.offset)
        self.offset += len(self.text(first))

    def take(self) -> dict[str, list[Any]]:
        out, self._new = self._new, _empty()
        return out


def _empty() -> dict[str, list[Any]]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def chat_content(text: TokenText, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """Chat's `logprobs.content` items for `entries`."""

    def item(token: int, logprob: float) -> dict[str, Any]:
        return {"token": text.label(token), "logprob": logprob, "bytes": list(text(token).encode())}

    return [
        item(e["id"], e["logprob"]) | {"top_logprobs": [item(t, lp) for t, lp in e["top"]]}
        for e in entries
        if not e.get("end")  # the stop token that ended the answer is not part of it
    ]

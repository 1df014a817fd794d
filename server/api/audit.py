"""The field audit of the OpenAI routes: request fields loraswap does not implement are refused (400 naming the
field and what is supported) unless they hold their neutral value, so nothing that would change the answer is
silently dropped. Fields that change nothing served (user, metadata, store, ...) are ignored. The README's table
"OpenAI request fields" lists every field and what loraswap does with it.

The request bodies keep the fields they do not declare (`extra="allow"`); `refuse_unsupported` checks those.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loraswap.server.api.errors import APIError

MAX_BIASES = 300
"""The most tokens one logit_bias may bias (OpenAI's limit)."""

_SHARED: dict[str, tuple[tuple[Any, ...], str]] = {
    # field: (values that change nothing, what loraswap supports instead)
    # vLLM's sampling extensions that clients send
    "top_k": ((None, 0, -1), "top_k is not supported (top_p is); send 0, -1 or nothing"),
    "min_p": ((None, 0, 0.0), "min_p is not supported (top_p is); send 0 or nothing"),
    "repetition_penalty": ((None, 1, 1.0), "repetition_penalty is not supported; send 1 or nothing"),
    "min_tokens": ((None, 0), "min_tokens is not supported (ignore_eos generates max_tokens); send 0 or nothing"),
    "include_stop_str_in_output": ((None, False), "stop strings are never included in the output"),
    "skip_special_tokens": ((None, True), "special tokens are always skipped in the output"),
    "use_beam_search": ((None, False), "beam search is not supported"),
    "guided_json": ((None,), "send response_format instead"),
    "guided_regex": ((None,), "regular-expression constraints are not supported"),
    "guided_choice": ((None,), "choice constraints are not supported"),
    "guided_grammar": ((None,), "grammar constraints are not supported"),
}

CHAT: dict[str, tuple[tuple[Any, ...], str]] = {
    **_SHARED,
    "audio": ((None,), "audio output is not supported; modalities can only be ['text']"),
    "modalities": ((None, ["text"]), "only ['text'] is supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "verbosity": ((None, "medium"), "only 'medium' is supported (the model's own length)"),
    "functions": ((None, []), "functions (deprecated) are not supported; see tools"),
    "function_call": ((None, "none"), "function_call (deprecated) is not supported; see tool_choice"),
    "echo": ((None, False), "echo is a /v1/completions field"),
}

COMPLETIONS: dict[str, tuple[tuple[Any, ...], str]] = {
    **_SHARED,
    "suffix": ((None, ""), "suffix (text after the insertion) is not supported"),
    "top_logprobs": ((None,), "send logprobs: N (0-5) on /v1/completions"),
    "response_format": ((None,), "response_format is a /v1/chat/completions field"),
    "tools": ((None, []), "tools are a /v1/chat/completions field"),
    "tool_choice": ((None, "none"), "tool_choice is a /v1/chat/completions field"),
    "adapters": ((None, []), "adapter mixtures are served on /v1/chat/completions and /v1/answer; name one model here"),
}


def refuse_unsupported(extra: Mapping[str, Any] | None, table: dict[str, tuple[tuple[Any, ...], str]]) -> None:
    """400 for the first field of `extra` (a body's undeclared fields) in `table` that holds a value other than its
    neutral ones."""
    for name, value in (extra or {}).items():
        rule = table.get(name)
        if rule is None:
            continue
        neutral, supported = rule
        if not any((value == n and type(value) is type(n)) or value is n for n in neutral):
            raise APIError(
                400,
                f"{name} is not supported with this value ({_short(value)}): {supported}",
                param=name,
                code="unsupported_parameter",
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def logit_bias(biases: dict[str, float] | None, vocabulary: int) -> tuple[tuple[int, float], ...]:
    """A request's logit_bias as (token id, bias) pairs; 400 for a key that is not a token id of the base's
    vocabulary, a bias outside [-100, 100], or more than MAX_BIASES tokens."""
    if not biases:
        return ()
    if len(biases) > MAX_BIASES:
        raise APIError(400, f"logit_bias biases {len(biases)} tokens; at most {MAX_BIASES}", param="logit_bias")
    pairs = []
    for key, bias in biases.items():
        if not key.strip().isdigit() or not 0 <= int(key) < vocabulary:
            raise APIError(
                400,
                f"logit_bias: {key!r} is not a token id of the base's vocabulary (0-{vocabulary - 1})",
                param="logit_bias",
            )
        if not -100 <= bias <= 100:
            message = f"logit_bias: the bias of token {key} is {bias}; biases go from -100 to 100"
            raise APIError(400, message, param="logit_bias")
        pairs.append((int(key), float(bias)))
    return tuple(pairs)

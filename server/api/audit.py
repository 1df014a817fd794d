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

_SHARED: dict[str, tuple[tuple[Any, ...], str]] = {
    # field: (values that change nothing, what loraswap supports instead)
    "frequency_penalty": ((None, 0, 0.0), "only 0 is supported (no frequency penalty)"),
    "presence_penalty": ((None, 0, 0.0), "only 0 is supported (no presence penalty)"),
    "logit_bias": ((None, {}), "logit_bias is not supported; send no biases"),
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

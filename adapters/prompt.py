"""The one prompt format shared by training, evaluation and serving.

The base's chat template renders a short system prompt, the question as the user turn and the
answer as the assistant turn. A base without a chat template gets a plain text template instead.
Training and serving must build the same token sequence for the same question, so both call
`prompt_ids`; the format's version goes into every adapter manifest, and a change to anything in
this file that alters the tokens must bump `PROMPT_FORMAT_VERSION`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

PROMPT_FORMAT_VERSION = 1
SYSTEM_PROMPT = "You are a careful medical information assistant. Answer the health question clearly and accurately."
_PLAIN_TEMPLATE = "{system}\n\nQuestion: {question}\nAnswer: "

_SPACES = re.compile(r"[ \t\f\v\u00a0]+")


def normalize_answer(text: str) -> str:
    """Collapse the whitespace runs MedQuAD keeps from its XML source.

    Lines are stripped, runs of spaces become one, and runs of blank lines become one blank line,
    so paragraphs and bullet lists keep their shape. The source file is never modified.
    """
    lines = [_SPACES.sub(" ", line).strip() for line in text.strip().splitlines()]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


def normalize_question(text: str) -> str:
    """The key questions are compared by: case and whitespace do not make a different question."""
    return " ".join(text.split()).lower()


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    """Causal bases: prompt + answer with -100 on prompt tokens (the loss is taken on answer tokens only).
    Seq2seq bases: the answer alone, the decoder's targets; `input_ids` is the prompt, the encoder's input."""


def render_prompt(tokenizer: Any, question: str, system: str = SYSTEM_PROMPT) -> str:
    """The text the model sees before it answers."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question.strip()}]
        return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return _PLAIN_TEMPLATE.format(system=system, question=question.strip())


def prompt_ids(tokenizer: Any, question: str, system: str = SYSTEM_PROMPT) -> list[int]:
    ids: list[int] = tokenizer(render_prompt(tokenizer, question, system), add_special_tokens=False)["input_ids"]
    return ids


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the end-of-turn token of the template (the tokenizer's eos)."""
    return [int(tokenizer.eos_token_id)]


def build_example(tokenizer: Any, question: str, answer: str, max_len: int, seq2seq: bool = False) -> Example | None:
    """Prompt + normalised answer + end-of-turn, truncated to `max_len` tokens (the answer is cut, never
    the prompt). Returns None when the prompt alone leaves fewer than 8 answer tokens. A seq2seq example
    keeps the prompt (encoder) and the answer (decoder) apart, cut by the same rule."""
    p = prompt_ids(tokenizer, question)
    a = tokenizer(normalize_answer(answer), add_special_tokens=False)["input_ids"] + stop_token_ids(tokenizer)
    room = max_len - len(p)
    if room < 8:
        return None
    a = a[:room]
    if seq2seq:
        return Example(input_ids=p, labels=a)
    return Example(input_ids=p + a, labels=[-100] * len(p) + a)


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """A conversation as the prompt text: through the chat template, or, for a base without one (T5), in the
    plain template's shape, so that a system turn and one question give exactly `render_prompt`'s text."""
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    parts: list[str] = []
    for m in messages:
        if m["role"] in ("system", "developer"):
            parts.append(f"{m['content']}\n\n")
        elif m["role"] == "assistant":
            parts.append(f"{m['content'].strip()}\n")
        else:
            parts.append(f"Question: {m['content'].strip()}\nAnswer: ")
    return "".join(parts)

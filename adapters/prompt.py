"""The one prompt format shared by training, evaluation and serving.

The base's chat template renders a short system prompt, the question as the user turn and the
answer as the assistant turn. A template that refuses a system turn (Gemma's) gets the system text at the
head of the user turn instead, and a base without a chat template gets a plain text template. An answer
ends with the template's end-of-turn token (`<|im_end|>` for ChatML bases such as SmolLM2 and Qwen2,
`<end_of_turn>` for Gemma, the eos token otherwise).
Training and serving must build the same token sequence for the same question, so both call
`prompt_ids`; the format's version goes into every adapter manifest, and a change to anything in
this file that alters the tokens must bump `PROMPT_FORMAT_VERSION`.
"""

from __future__ import annotations

import functools
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

PROMPT_FORMAT_VERSION = 1
SYSTEM_PROMPT = "You are a careful medical information assistant. Answer the health question clearly and accurately."
_PLAIN_TEMPLATE = "{system}\n\nQuestion: {question}\nAnswer: "

_T = TypeVar("_T")
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


def chat_messages(tokenizer: Any, system: str, question: str) -> list[dict[str, str]]:
    """The system and user turns, or one user turn holding both where the template refuses a system turn."""
    if accepts_system_turn(tokenizer):
        return [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return [{"role": "user", "content": f"{system}\n\n{question}"}]


def _per_template(fn: Callable[[Any], _T]) -> Callable[[Any], _T]:
    """Memoize `fn(tokenizer)` per tokenizer and chat template (training calls it for every example)."""
    memo: weakref.WeakKeyDictionary[Any, tuple[Any, _T]] = weakref.WeakKeyDictionary()

    @functools.wraps(fn)
    def wrapper(tokenizer: Any) -> _T:
        template = getattr(tokenizer, "chat_template", None)
        try:
            hit = memo.get(tokenizer)
        except TypeError:  # not weakly referenceable: no memo
            return fn(tokenizer)
        if hit is not None and hit[0] == template:
            return hit[1]
        value = fn(tokenizer)
        memo[tokenizer] = (template, value)
        return value

    return wrapper


@_per_template
def accepts_system_turn(tokenizer: Any) -> bool:
    """Whether the chat template renders a system turn; Gemma's raises ("System role not supported")."""
    from jinja2.exceptions import TemplateError

    try:
        tokenizer.apply_chat_template(
            [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], tokenize=False
        )
    except TemplateError:
        return False
    return True


def render_prompt(tokenizer: Any, question: str, system: str = SYSTEM_PROMPT) -> str:
    """The text the model sees before it answers."""
    if getattr(tokenizer, "chat_template", None):
        messages = chat_messages(tokenizer, system, question.strip())
        return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return _PLAIN_TEMPLATE.format(system=system, question=question.strip())


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """A whole conversation (the API's chat route), in the format `render_prompt` gives one question: a leading
    system turn joins the first user turn where the template refuses one, and a base without a chat template
    gets the plain template's Question/Answer lines, one pair per exchange. Raises jinja2's TemplateError
    for messages the template refuses (such as two user turns in a row, for some templates)."""
    system = messages[0]["content"] if messages and messages[0]["role"] in ("system", "developer") else None
    rest = messages[1:] if system is not None else messages
    if not getattr(tokenizer, "chat_template", None):
        parts = [system if system is not None else SYSTEM_PROMPT, "\n\n"]
        for m in rest:
            if m["role"] == "user":
                parts.append(f"Question: {m['content'].strip()}\nAnswer: ")
            else:
                parts.append(f"{m['content'].strip()}\n\n")
        return "".join(parts)
    if system is not None and rest and rest[0]["role"] == "user" and not accepts_system_turn(tokenizer):
        rest = [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
    else:
        rest = messages
    return str(tokenizer.apply_chat_template(rest, add_generation_prompt=True, tokenize=False))


def prompt_ids(tokenizer: Any, question: str, system: str = SYSTEM_PROMPT) -> list[int]:
    ids: list[int] = tokenizer(render_prompt(tokenizer, question, system), add_special_tokens=False)["input_ids"]
    return ids


_ANSWER_MARK = "\u2063loraswap-answer\u2063"


@_per_template
def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes the answer turn: the first token the chat template writes after an assistant
    message (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`, `</s>`), when it is a special token; else eos."""
    if getattr(tokenizer, "chat_template", None):
        messages = [*chat_messages(tokenizer, "s", "u"), {"role": "assistant", "content": _ANSWER_MARK}]
        text = str(tokenizer.apply_chat_template(messages, tokenize=False))
        _, found, tail = text.partition(_ANSWER_MARK)
        ids = tokenizer(tail.lstrip(" "), add_special_tokens=False)["input_ids"] if found else []
        if ids and _is_special(tokenizer, ids[0]):
            return int(ids[0])
    return int(tokenizer.eos_token_id)


def _is_special(tokenizer: Any, token_id: int) -> bool:
    """A special token: named (eos, bos, ...) or added as special (Qwen's <|im_end|>, Gemma's <end_of_turn>)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(token_id)
    return token_id in tokenizer.all_special_ids or bool(getattr(added, "special", False))


def generation_eos(model: Any) -> int | list[int] | None:
    """The model's `generation_config.eos_token_id` (an id, a list of ids, or None)."""
    config = getattr(model, "generation_config", None)
    return getattr(config, "eos_token_id", None)


def stop_token_ids(tokenizer: Any, generation_eos: int | list[int] | None = None) -> list[int]:
    """Token ids that end an answer: the template's end-of-turn token first (training appends it to every
    answer), then the tokenizer's eos and the model's `generation_config.eos_token_id` (`generation_eos`)."""
    extra = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    ids = [end_of_turn_id(tokenizer), tokenizer.eos_token_id, *extra]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def build_example(tokenizer: Any, question: str, answer: str, max_len: int, seq2seq: bool = False) -> Example | None:
    """Prompt + normalised answer + end-of-turn, truncated to `max_len` tokens (the answer is cut, never
    the prompt). Returns None when the prompt alone leaves fewer than 8 answer tokens. A seq2seq example
    keeps the prompt (encoder) and the answer (decoder) apart, cut by the same rule."""
    p = prompt_ids(tokenizer, question)
    a = tokenizer(normalize_answer(answer), add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]
    room = max_len - len(p)
    if room < 8:
        return None
    a = a[:room]
    if seq2seq:
        return Example(input_ids=p, labels=a)
    return Example(input_ids=p + a, labels=[-100] * len(p) + a)

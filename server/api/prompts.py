"""Prompts made in the API process: the base's tokenizer and chat template, the context's limits, and the `Job`
that carries a prompt to a worker.

Tokenizing runs off the event loop on one thread (tokenizers are not thread-safe), and text far too long for the
context is refused before it is tokenized: a megabyte takes the tokenizer a second that every other request
would wait for.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from loraswap.adapters.base import load_tokenizer
from loraswap.adapters.prompt import prompt_ids, render_chat
from loraswap.server.api.catalog import Catalog
from loraswap.server.api.errors import APIError
from loraswap.server.jobs import Job
from loraswap.server.settings import Settings

T = TypeVar("T")


class Prompts:
    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog  # its base's tokenizer and context
        self._tokenizer: Any = None
        self._max_token_bytes = 0
        self._thread: ThreadPoolExecutor | None = None  # made in the API process, on first use

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_thread": None}

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.catalog.ref)
            vocab = self._tokenizer.get_vocab()
            # No token covers more bytes of text than its own spelling takes (byte-level and sentencepiece
            # spellings are at least as long as the bytes they stand for).
            self._max_token_bytes = max((len(t.encode()) for t in vocab), default=1) or 1
        return self._tokenizer

    @property
    def context(self) -> int:
        return int(self.catalog.ref.arch.get("max_position_embeddings", 2048))

    def check_text_fits(self, nbytes: int, param: str) -> None:
        """Refuse, without tokenizing it, text too long for the context whatever its tokens."""
        _ = self.tokenizer  # loaded first: it measures the longest token
        if nbytes > self.context * self._max_token_bytes:
            raise APIError(
                400,
                f"the prompt has {nbytes} bytes of text, more than the context length of {self.context} tokens "
                "can hold",
                param=param,
                code="context_length_exceeded",
            )

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` (chat templates, tokenizing) off the event loop, one at a time."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="loraswap-prompts")
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat's prompt ids, through the base's chat template (400 if the template refuses the messages)."""
        from jinja2 import TemplateError

        try:
            text = render_chat(self.tokenizer, messages)
        except TemplateError as e:  # templates may refuse some role orders
            raise APIError(400, f"the base's chat template refuses these messages: {e}", param="messages") from None
        self.check_text_fits(len(text.encode()), "messages")  # many short messages add up in the template
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def question(self, question: str) -> list[int]:
        """A question's prompt ids, in the adapters' prompt format."""
        return prompt_ids(self.tokenizer, question)

    def job(
        self,
        prompt: list[int],
        adapter: str | None,
        max_tokens: int | None,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: tuple[str, ...],
        ignore_eos: bool = False,
        grammar: str | None = None,
        mixture: tuple[tuple[str, float], ...] = (),
    ) -> Job:
        """A job for the workers, with a new uid; 400 if it asks for more tokens than the server allows or its
        prompt leaves no room in the context."""
        limit = self.settings.max_tokens
        wanted = max_tokens or limit
        if wanted > limit:
            raise APIError(
                400,
                f"max_tokens is {wanted}; this server allows at most {limit}",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        context = self.context
        if len(prompt) + 1 > context:
            raise APIError(
                400,
                f"the prompt is {len(prompt)} tokens; the context length is {context}",
                param="messages",
                code="context_length_exceeded",
            )
        return Job(
            uid=str(uuid.uuid4()),
            prompt_ids=prompt,
            adapter=adapter,
            max_tokens=wanted,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
            grammar=grammar,
            mixture=mixture,
        )

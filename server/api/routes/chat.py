"""POST /v1/chat/completions: OpenAI's chat completions, streamed or not, with any adapter as the model ("auto": the
one the router picks for the last user message), `n` choices and token log-probabilities."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from loraswap.adapters.prompt import SYSTEM_PROMPT
from loraswap.server.api import choices
from loraswap.server.api.audit import CHAT, logit_bias, refuse_unsupported
from loraswap.server.api.auth import authorize
from loraswap.server.api.bridge import Bridge
from loraswap.server.api.catalog import Catalog
from loraswap.server.api.errors import APIError, from_event
from loraswap.server.api.logprobs import TokenText, chat_content
from loraswap.server.api.prompts import Prompts
from loraswap.server.api.protocol import (
    ChatRequest,
    StreamOptions,
    chat_chunk,
    chat_completion,
    finish_reason,
    new_id,
    read_body,
    sse,
    usage_so_far,
)
from loraswap.server.jobs import Job, JobEvent

ROUTE = "/v1/chat/completions"


async def chat(catalog: Catalog, prompts: Prompts, bridge: Bridge, request: Request) -> Response:
    settings = catalog.settings
    try:
        authorize(request, settings)
        body = await read_body(request, ChatRequest, settings.max_body_bytes)
        refuse_unsupported(body.model_extra, CHAT)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompts.check_text_fits(sum(len(m["content"].encode()) for m in messages), "messages")
        model = body.model
        if body.model == "auto":  # the router reads the last user message
            said = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
            adapter = (await catalog.route(said, "model"))[0]
            model = adapter or "base"
        else:
            adapter = await catalog.resolve(body.model, "model")
        request.state.adapter = adapter or "base"  # only known names become labels
        if messages[0]["role"] not in ("system", "developer"):
            messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        prompt = await prompts.run(lambda: prompts.chat(messages))
        job = prompts.job(
            prompt,
            adapter,
            body.limit(),
            body.temperature,
            body.top_p,
            body.seed,
            body.stop_list(),
            body.ignore_eos,
        )
        biases = logit_bias(body.logit_bias, len(prompts.tokenizer))
        job = dataclasses.replace(
            job, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty, logit_bias=biases
        )
    except APIError as e:
        return e.response()
    group = _choices(job, body)
    cid = new_id("chatcmpl")
    text = TokenText(prompts.tokenizer, as_ids=body.return_tokens_as_token_ids) if body.logprobs else None
    if body.stream:
        stream = _stream(bridge, group, text, cid, model, body.stream_options)
        return StreamingResponse(stream, media_type="text/event-stream")
    parts: list[list[str]] = [[] for _ in group]
    content: list[list[dict[str, Any]]] = [[] for _ in group]
    last: list[JobEvent | None] = [None for _ in group]
    try:
        async with choices.closing(choices.events(bridge, [group], ROUTE)) as events:
            async for c, ev in events:
                if ev.error:
                    return from_event(ev).response()
                parts[c.index].append(ev.text)
                if text is not None and ev.logprobs:
                    content[c.index] += chat_content(text, ev.logprobs)
                if ev.finish_reason:
                    last[c.index] = ev
    except APIError as e:
        return e.response()
    ends = [ev for ev in last if ev is not None]
    out = chat_completion(cid, model, "".join(parts[0]), finish_reason(ends[0].finish_reason or "stop"), _usage(ends))
    out["choices"] = [
        {
            "index": i,
            "message": {"role": "assistant", "content": "".join(parts[i])},
            "logprobs": {"content": content[i], "refusal": None} if text is not None else None,
            "finish_reason": finish_reason(ev.finish_reason or "stop"),
        }
        for i, ev in enumerate(ends)
    ]
    return JSONResponse(out)


def _choices(job: Job, body: ChatRequest) -> list[choices.Choice]:
    """The request's n jobs: `job` and its siblings, each with its own uid and seed (seed + index)."""
    top = (body.top_logprobs or 0) if body.logprobs else None
    group = []
    for k in range(body.n):
        seed = None if body.seed is None else body.seed + k
        uid = job.uid if k == 0 else f"{job.uid}-{k}"
        group.append(choices.Choice(k, 0, dataclasses.replace(job, uid=uid, seed=seed, logprobs=top)))
    return group


def _usage(ends: list[JobEvent]) -> dict[str, Any]:
    """Usage over the choices: the prompt counted once, every choice's tokens."""
    prompt, generated = ends[0].prompt_tokens, sum(e.completion_tokens for e in ends)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
        "prompt_tokens_details": {"cached_tokens": sum(e.cached_tokens for e in ends)},
    }


async def _stream(
    bridge: Bridge,
    group: list[choices.Choice],
    text: TokenText | None,
    cid: str,
    model: str,
    options: StreamOptions | None,
) -> AsyncIterator[str]:
    """Server-sent chunks: each choice's role first, then its text (and log-probabilities) as it comes, its
    finish_reason; usage last if asked for (and on every chunk with continuous_usage_stats)."""
    created = int(time.time())
    include_usage = bool(options and options.include_usage)
    every = bool(options and options.continuous_usage_stats)

    def chunk(
        index: int, delta: dict[str, Any], finish: str | None, logprobs: Any = None, ev: JobEvent | None = None
    ) -> str:
        out = chat_chunk(cid, model, created, delta, finish)
        out["choices"][0]["index"] = index
        if text is not None:
            out["choices"][0]["logprobs"] = logprobs
        if every and ev is not None:
            out["usage"] = usage_so_far(ev)
        return sse(out)

    for c in group:
        yield chunk(c.index, {"role": "assistant", "content": ""}, None)
    ends: list[JobEvent] = []
    try:
        async with choices.closing(choices.events(bridge, [group], ROUTE)) as events:
            async for c, ev in events:
                if ev.error:
                    yield sse(from_event(ev).body)
                    return
                items = chat_content(text, ev.logprobs) if text is not None and ev.logprobs else []
                lp = {"content": items, "refusal": None} if items else None
                if ev.text or lp:
                    yield chunk(c.index, {"content": ev.text}, None, lp, ev)
                if ev.finish_reason:
                    ends.append(ev)
                    yield chunk(c.index, {}, finish_reason(ev.finish_reason), None, ev)
    except APIError as e:
        yield sse(e.body)
        return
    if include_usage:
        yield sse(chat_chunk(cid, model, created, {}, None) | {"choices": [], "usage": _usage(ends)})
    yield sse("[DONE]")

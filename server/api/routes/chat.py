"""POST /v1/chat/completions: OpenAI's chat completions, streamed or not, with any adapter as the model."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from loraswap.adapters.prompt import SYSTEM_PROMPT
from loraswap.server.api.auth import authorize
from loraswap.server.api.bridge import Bridge
from loraswap.server.api.catalog import Catalog
from loraswap.server.api.errors import APIError, from_event
from loraswap.server.api.prompts import Prompts
from loraswap.server.api.protocol import (
    ChatRequest,
    chat_chunk,
    chat_completion,
    collect,
    finish_reason,
    new_id,
    read_body,
    sse,
    usage,
)
from loraswap.server.jobs import Job

ROUTE = "/v1/chat/completions"


async def chat(catalog: Catalog, prompts: Prompts, bridge: Bridge, request: Request) -> Response:
    settings = catalog.settings
    try:
        authorize(request, settings)
        body = await read_body(request, ChatRequest, settings.max_body_bytes)
        adapter = await catalog.resolve(body.model, "model")
        request.state.adapter = adapter or "base"  # only known names become labels
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompts.check_text_fits(sum(len(m["content"].encode()) for m in messages), "messages")
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
    except APIError as e:
        return e.response()
    cid = new_id("chatcmpl")
    if body.stream:
        include = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(bridge, job, cid, body.model, include), media_type="text/event-stream")
    return await collect(
        bridge.events(job, ROUTE), lambda text, fin, use: chat_completion(cid, body.model, text, fin, use)
    )


async def _stream(bridge: Bridge, job: Job, cid: str, model: str, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent chunks: the role first, then the text as it comes, the finish_reason, usage if asked for."""
    created = int(time.time())
    yield sse(chat_chunk(cid, model, created, {"role": "assistant", "content": ""}, None))
    try:
        async for ev in bridge.events(job, ROUTE):
            if ev.error:
                yield sse(from_event(ev).body)
                return
            if ev.text:
                yield sse(chat_chunk(cid, model, created, {"content": ev.text}, None))
            if ev.finish_reason:
                yield sse(chat_chunk(cid, model, created, {}, finish_reason(ev.finish_reason)))
                if include_usage:
                    chunk = chat_chunk(cid, model, created, {}, None) | {"choices": [], "usage": usage(ev)}
                    yield sse(chunk)
    except APIError as e:
        yield sse(e.body)
        return
    yield sse("[DONE]")

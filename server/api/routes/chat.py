"""POST /v1/chat/completions: OpenAI's chat completions, streamed or not, with any adapter as the model."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from loraswap.adapters.prompt import SYSTEM_PROMPT
from loraswap.server.api import structured
from loraswap.server.api.auth import authorize
from loraswap.server.api.bridge import Bridge
from loraswap.server.api.catalog import Catalog
from loraswap.server.api.errors import APIError, from_event
from loraswap.server.api.mixtures import Mixture, mixture
from loraswap.server.api.prompts import Prompts
from loraswap.server.api.protocol import (
    AdapterScale,
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
        adapter = catalog.lookup(body.model, "model")
        mix = openai_mixture(catalog, body.adapters, adapter)
        request.state.adapter = "mixture" if mix else adapter or "base"  # only known names become labels
        output = structured.plan(body)
        if output.grammar and body.ignore_eos:
            raise APIError(400, "ignore_eos cannot be combined with structured output or tools", param="ignore_eos")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompts.check_text_fits(sum(len(m["content"].encode()) for m in messages), "messages")
        if messages[0]["role"] not in ("system", "developer"):
            messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        if output.tools:
            messages[0]["content"] += "\n\n" + structured.tool_prompt(output)
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
            grammar=output.grammar,
            mixture=mix,
        )
    except APIError as e:
        return e.response()
    cid = new_id("chatcmpl")
    if body.stream:
        include = bool(body.stream_options and body.stream_options.include_usage)
        tools = output if output.tools else None
        return StreamingResponse(_stream(bridge, job, cid, body.model, include, tools), media_type="text/event-stream")

    def build(text: str, fin: str, use: dict[str, int]) -> dict[str, Any]:
        out = chat_completion(cid, body.model, text, fin, use)
        content, calls = structured.tool_calls(text, output) if output.tools and fin == "stop" else (text, [])
        if calls:
            out["choices"][0]["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
            out["choices"][0]["finish_reason"] = "tool_calls"
        return out

    return await collect(bridge.events(job, ROUTE), build)


def openai_mixture(catalog: Catalog, adapters: list[AdapterScale] | None, model_adapter: str | None) -> Mixture:
    """The `adapters` extension's mixture (`model` must then name the base: the list says which adapters run)."""
    if not adapters:
        return ()
    if model_adapter is not None:
        raise APIError(
            400, "with 'adapters', 'model' names the base ('base'); the list says which adapters run", param="model"
        )
    return mixture(catalog, [(a.name, a.scale) for a in adapters], "adapters")


async def _stream(
    bridge: Bridge, job: Job, cid: str, model: str, include_usage: bool, tools: structured.Plan | None = None
) -> AsyncIterator[str]:
    """Server-sent chunks: the role first, then the text as it comes, the finish_reason, usage if asked for. With
    tools, calls come whole (one chunk) at the end, once their JSON is complete; with tool_choice "auto" the text
    before the first call streams as it comes (`structured.CallStream`)."""
    created = int(time.time())
    yield sse(chat_chunk(cid, model, created, {"role": "assistant", "content": None if tools else ""}, None))
    calls_of = structured.CallStream(tools) if tools is not None else None
    try:
        async for ev in bridge.events(job, ROUTE):
            if ev.error:
                yield sse(from_event(ev).body)
                return
            text = ev.text if calls_of is None else calls_of.feed(ev.text)
            if text:
                yield sse(chat_chunk(cid, model, created, {"content": text}, None))
            if ev.finish_reason:
                fin: str = finish_reason(ev.finish_reason)
                if calls_of is not None:
                    content, calls = calls_of.finish(fin)
                    if content:
                        yield sse(chat_chunk(cid, model, created, {"content": content}, None))
                    if calls:
                        delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
                        yield sse(chat_chunk(cid, model, created, delta, None))
                        fin = "tool_calls"
                yield sse(chat_chunk(cid, model, created, {}, fin))
                if include_usage:
                    chunk = chat_chunk(cid, model, created, {}, None) | {"choices": [], "usage": usage(ev)}
                    yield sse(chunk)
    except APIError as e:
        yield sse(e.body)
        return
    yield sse("[DONE]")

"""POST /v1/answer: a question answered by a named adapter, or by the one the router picks ("auto")."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from loraswap.server.api.auth import authorize
from loraswap.server.api.bridge import Bridge
from loraswap.server.api.catalog import Catalog
from loraswap.server.api.errors import APIError, from_event
from loraswap.server.api.mixtures import Mixture, mixture, soft_route
from loraswap.server.api.prompts import Prompts
from loraswap.server.api.protocol import AnswerRequest, collect, finish_reason, new_id, read_body, sse, usage
from loraswap.server.jobs import Job

ROUTE = "/v1/answer"


async def answer(catalog: Catalog, prompts: Prompts, bridge: Bridge, request: Request) -> Response:
    settings = catalog.settings
    try:
        authorize(request, settings)
        body = await read_body(request, AnswerRequest, settings.max_body_bytes)
        prompts.check_text_fits(len(body.question.encode()), "question")
        routed = None
        mix: Mixture = ()
        if body.route == "soft" and body.adapter != "auto":
            raise APIError(400, "route 'soft' mixes the router's choices: it needs adapter 'auto'", param="route")
        if isinstance(body.adapter, dict):
            mix, adapter = await mixture(catalog, list(body.adapter.items()), "adapter"), None
        elif body.adapter == "auto" and body.route == "soft":
            adapter, mix, routed = await soft_route(catalog, body.question)
        elif body.adapter == "auto":
            adapter, routed = await catalog.route(body.question)
        else:
            adapter = await catalog.resolve(body.adapter, "adapter")
        request.state.adapter = "mixture" if mix else adapter or "base"
        question = body.question
        job = prompts.job(
            await prompts.run(lambda: prompts.question(question)),
            adapter,
            body.max_tokens,
            body.temperature,
            body.top_p,
            None,
            (),
            body.ignore_eos,
            mixture=mix,
        )
    except APIError as e:
        return e.response()
    head: dict[str, Any] = {"id": new_id("ans"), "adapter": dict(mix) if mix else adapter or "base"}
    if routed:
        head["routed"] = routed
    if body.stream:
        return StreamingResponse(_stream(bridge, job, head), media_type="text/event-stream")
    return await collect(
        bridge.events(job, ROUTE),
        lambda text, fin, use: {**head, "answer": text, "finish_reason": fin, "usage": use},
    )


async def _stream(bridge: Bridge, job: Job, head: dict[str, Any]) -> AsyncIterator[str]:
    """Server-sent events: each carries `head` and the new text; the last one the finish_reason and usage."""
    try:
        async for ev in bridge.events(job, ROUTE):
            if ev.error:
                yield sse(from_event(ev).body)
                return
            out: dict[str, Any] = {**head, "delta": ev.text}
            if ev.finish_reason:
                out["finish_reason"] = finish_reason(ev.finish_reason)
                out["usage"] = usage(ev)
            yield sse(out)
    except APIError as e:
        yield sse(e.body)
        return
    yield sse("[DONE]")

"""POST /v1/chat/completions: OpenAI's chat completions, streamed or not, with any adapter as the model ("auto": the
one the router picks for the last user message), `n` choices, token log-probabilities, structured output and tools
(`structured.py`), and adapter mixtures (the `adapters` extension, `mixtures.py`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from loraswap.adapters.prompt import SYSTEM_PROMPT
from loraswap.server.api import choices, structured
from loraswap.server.api.audit import CHAT, logit_bias, refuse_unsupported
from loraswap.server.api.auth import authorize
from loraswap.server.api.bridge import Bridge
from loraswap.server.api.catalog import Catalog
from loraswap.server.api.errors import APIError, from_event
from loraswap.server.api.logprobs import TokenText, chat_content
from loraswap.server.api.mixtures import Mixture, mixture
from loraswap.server.api.prompts import Prompts
from loraswap.server.api.protocol import (
    AdapterScale,
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
        output = structured.plan(body)
        if output.grammar and body.ignore_eos:
            raise APIError(400, "ignore_eos cannot be combined with structured output or tools", param="ignore_eos")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompts.check_text_fits(sum(len(m["content"].encode()) for m in messages), "messages")
        model = body.model
        if body.model == "auto":  # the router reads the last user message
            said = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
            adapter = (await catalog.route(said, "model"))[0]
            model = adapter or "base"
        else:
            adapter = await catalog.resolve(body.model, "model")
        mix = await openai_mixture(catalog, body.adapters, adapter)
        request.state.adapter = "mixture" if mix else adapter or "base"  # only known names become labels
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
        tools = output if output.tools else None
        stream = _stream(bridge, group, text, cid, model, body.stream_options, tools)
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
    out["choices"] = []
    for i, ev in enumerate(ends):
        said, fin = "".join(parts[i]), str(finish_reason(ev.finish_reason or "stop"))
        message: dict[str, Any] = {"role": "assistant", "content": said}
        if output.tools and fin == "stop":
            rest, calls = structured.tool_calls(said, output)
            if calls:
                message = {"role": "assistant", "content": rest, "tool_calls": calls}
                fin = "tool_calls"
        logprobs = {"content": content[i], "refusal": None} if text is not None else None
        out["choices"].append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": fin})
    return JSONResponse(out)


async def openai_mixture(catalog: Catalog, adapters: list[AdapterScale] | None, model_adapter: str | None) -> Mixture:
    """The `adapters` extension's mixture (`model` must then name the base: the list says which adapters run)."""
    if not adapters:
        return ()
    if model_adapter is not None:
        raise APIError(
            400, "with 'adapters', 'model' names the base ('base'); the list says which adapters run", param="model"
        )
    return await mixture(catalog, [(a.name, a.scale) for a in adapters], "adapters")


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
    tools: structured.Plan | None = None,
) -> AsyncIterator[str]:
    """Server-sent chunks: each choice's role first, then its text (and log-probabilities) as it comes, its
    finish_reason; usage last if asked for (and on every chunk with continuous_usage_stats). With tools, a choice's
    calls come whole (one chunk) at its end, once their JSON is complete; with tool_choice "auto" the text before
    the first call streams as it comes (`structured.CallStream`)."""
    created = int(time.time())
    include_usage = bool(options and options.include_usage)
    every = bool(options and options.continuous_usage_stats)
    calls_of = {c.index: structured.CallStream(tools) for c in group} if tools is not None else {}

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
        yield chunk(c.index, {"role": "assistant", "content": None if tools else ""}, None)
    ends: list[JobEvent] = []
    try:
        async with choices.closing(choices.events(bridge, [group], ROUTE)) as events:
            async for c, ev in events:
                if ev.error:
                    yield sse(from_event(ev).body)
                    return
                items = chat_content(text, ev.logprobs) if text is not None and ev.logprobs else []
                lp = {"content": items, "refusal": None} if items else None
                said = calls_of[c.index].feed(ev.text) if tools is not None else ev.text
                if said or lp:
                    yield chunk(c.index, {"content": said}, None, lp, ev)
                if ev.finish_reason:
                    ends.append(ev)
                    fin: str = finish_reason(ev.finish_reason)
                    if tools is not None:
                        rest, calls = calls_of[c.index].finish(fin)
                        if rest:
                            yield chunk(c.index, {"content": rest}, None)
                        if calls:
                            yield chunk(c.index, {"tool_calls": [{"index": i, **x} for i, x in enumerate(calls)]}, None)
                            fin = "tool_calls"
                    yield chunk(c.index, {}, fin, None, ev)
    except APIError as e:
        yield sse(e.body)
        return
    if include_usage:
        yield sse(chat_chunk(cid, model, created, {}, None) | {"choices": [], "usage": _usage(ends)})
    yield sse("[DONE]")

"""POST /v1/completions: OpenAI's legacy completions, as vLLM serves them: raw prompts (no chat template) given as
text or token ids, several prompts and `n` choices of each in one request, log-probabilities of the generated
tokens and, with `echo`, of the prompt's (`max_tokens: 0` with `echo` scores a text without generating: how
lm-evaluation-harness computes log-likelihoods). Scoring runs on the workers with the adapter's LoRA, in the same
batches as generation (`server/worker/logprobs.py`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from loraswap.server.api import choices
from loraswap.server.api.audit import COMPLETIONS, logit_bias, refuse_unsupported
from loraswap.server.api.auth import authorize
from loraswap.server.api.bridge import Bridge
from loraswap.server.api.catalog import Catalog
from loraswap.server.api.errors import APIError, from_event
from loraswap.server.api.logprobs import CompletionLogprobs, TokenText
from loraswap.server.api.prompts import Prompts
from loraswap.server.api.protocol import StreamOptions, finish_reason, new_id, read_body, sse, usage_so_far
from loraswap.server.api.protocol_completions import MAX_CHOICES, CompletionRequest, completion, completion_chunk
from loraswap.server.jobs import JobEvent

ROUTE = "/v1/completions"


@dataclass
class _Prompt:
    ids: list[int]
    text: str
    """What echo sends back: the prompt's own text, or its token ids decoded."""
    adapter: str | None


@dataclass
class _Choice:
    """What one choice has gathered so far."""

    prompt: _Prompt
    logprobs: CompletionLogprobs | None
    started: bool = False
    text: list[str] = field(default_factory=list)
    finish: str | None = None
    last: JobEvent | None = None
    scores: list[float] = field(default_factory=list)
    """The generated tokens' log-probabilities (best_of ranks choices by their mean)."""


class _Request:
    """A validated request: its prompts, the jobs that answer them, and how their events become choices."""

    def __init__(self, body: CompletionRequest, prompts: list[_Prompt], groups: list[list[choices.Choice]]) -> None:
        self.body = body
        self.prompts = prompts
        self.groups = groups
        self.scoring_only = body.max_tokens == 0  # the jobs generate one token, which is not reported

    def model(self) -> str:
        """The response's model: as asked, or for "auto" the adapter the router chose (if one for all prompts)."""
        if self.body.model != "auto":
            return self.body.model
        names = {p.adapter or "base" for p in self.prompts}
        return names.pop() if len(names) == 1 else "auto"

    def states(self, text: TokenText) -> list[_Choice]:
        lp = self.body.logprobs is not None
        return [
            _Choice(self.prompts[c.prompt], CompletionLogprobs(text) if lp else None) for g in self.groups for c in g
        ]

    def update(self, st: _Choice, ev: JobEvent) -> str:
        """Take `ev` into the choice's state; the text it adds to the choice."""
        text = ""
        if not st.started:
            st.started = True
            if self.body.echo:
                text = st.prompt.text
                if st.logprobs is not None and ev.prompt_logprobs is not None:
                    st.logprobs.add_first(st.prompt.ids[0])
                    st.logprobs.add(ev.prompt_logprobs[1:])
                if st.logprobs is not None:
                    st.logprobs.offset = len(text)  # generated tokens' offsets follow the echoed text
        if not self.scoring_only:
            text += ev.text
            if st.logprobs is not None and ev.logprobs:
                st.logprobs.add(ev.logprobs)
            st.scores += [e["logprob"] for e in ev.logprobs or ()]  # a stop token's counts, as vLLM's cumulative
        if ev.finish_reason:
            st.finish = "length" if self.scoring_only else finish_reason(ev.finish_reason)
            st.last = ev
        st.text.append(text)
        return text

    def best(self, states: list[_Choice]) -> list[_Choice]:
        """The choices returned: with best_of, each prompt's n of highest mean log-probability per token (OpenAI's
        rule), in that order; else all."""
        runs, n = self.body.runs(), self.body.n
        if runs == n:
            return states
        kept = []
        for start in range(0, len(states), runs):
            group = states[start : start + runs]
            group.sort(key=lambda s: sum(s.scores) / len(s.scores) if s.scores else float("-inf"), reverse=True)
            kept += group[:n]
        return kept

    def usage(self, states: list[_Choice]) -> dict[str, Any]:
        prompt = sum(len(p.ids) for p in self.prompts)
        done = [s.last for s in states if s.last is not None]
        generated = 0 if self.scoring_only else sum(e.completion_tokens for e in done)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": generated,
            "total_tokens": prompt + generated,
            "prompt_tokens_details": {"cached_tokens": sum(e.cached_tokens for e in done)},
        }


async def completions(catalog: Catalog, prompts: Prompts, bridge: Bridge, request: Request) -> Response:
    settings = catalog.settings
    try:
        authorize(request, settings)
        body = await read_body(request, CompletionRequest, settings.max_body_bytes)
        refuse_unsupported(body.model_extra, COMPLETIONS)
        req = await _validate(catalog, prompts, body)
        request.state.adapter = "auto" if body.model == "auto" else (req.prompts[0].adapter or "base")
    except APIError as e:
        return e.response()
    cid = new_id("cmpl")
    text = TokenText(prompts.tokenizer, as_ids=body.return_tokens_as_token_ids)
    if body.stream:
        stream = _stream(bridge, req, text, cid, body.stream_options)
        return StreamingResponse(stream, media_type="text/event-stream")
    states = req.states(text)
    try:
        async with choices.closing(choices.events(bridge, req.groups, ROUTE)) as events:
            async for c, ev in events:
                if ev.error:
                    return from_event(ev).response()
                req.update(states[c.index], ev)
    except APIError as e:
        return e.response()
    out = [
        {
            "index": i,
            "text": "".join(s.text),
            "logprobs": s.logprobs.take() if s.logprobs is not None else None,
            "finish_reason": s.finish,
        }
        for i, s in enumerate(req.best(states))
    ]
    return JSONResponse(completion(cid, req.model(), out, req.usage(states)))


async def _validate(catalog: Catalog, prompts: Prompts, body: CompletionRequest) -> _Request:
    """The prompts tokenized and checked, each with its adapter, and the jobs that answer them; else a 4xx."""
    given = body.prompts()
    runs = body.runs()
    if len(given) * runs > MAX_CHOICES:
        raise APIError(
            400,
            f"{len(given)} prompts with n={body.n}, best_of={body.best_of} ask for {len(given) * runs} completions; "
            f"the limit is {MAX_CHOICES}",
            param="n",
        )
    if body.echo and catalog.ref.kind == "seq2seq":
        raise APIError(400, "echo scores the prompt, which an encoder-decoder base does not predict", param="echo")
    for g in given:
        if isinstance(g, str):
            prompts.check_text_fits(len(g.encode()), "prompt")
    tokenizer = prompts.tokenizer
    vocab = len(tokenizer)

    def encode() -> list[tuple[list[int], str]]:
        out = []
        for g in given:
            if isinstance(g, str):
                out.append((list(tokenizer(g)["input_ids"]), g))
            else:
                bad = [t for t in g if not 0 <= t < vocab]
                if bad:
                    message = f"prompt: token id {bad[0]} is not in the vocabulary (0-{vocab - 1})"
                    raise APIError(400, message, param="prompt")
                out.append((list(g), str(tokenizer.decode(g))))
        return out

    encoded = await prompts.run(encode)
    found: list[_Prompt] = []
    for ids, text in encoded:
        if not ids:
            raise APIError(400, "the prompt is empty once tokenized", param="prompt")
        if len(ids) + 1 > prompts.context:
            raise APIError(
                400,
                f"the prompt is {len(ids)} tokens; the context length is {prompts.context}",
                param="prompt",
                code="context_length_exceeded",
            )
        if body.model == "auto":  # each prompt is routed on its own
            adapter = (await catalog.route(text, "model"))[0]
        else:
            adapter = await catalog.resolve(body.model, "model")
        found.append(_Prompt(ids, text, adapter))
    scoring_only = body.max_tokens == 0
    biases = logit_bias(body.logit_bias, vocab)
    generated_logprobs = body.logprobs
    if generated_logprobs is None and runs > body.n:
        generated_logprobs = 0  # best_of ranks by the generated tokens' log-probabilities
    if scoring_only:
        generated_logprobs = None
    wanted = None if body.max_tokens is None else max(1, body.max_tokens)
    groups: list[list[choices.Choice]] = []
    for p_index, p in enumerate(found):
        group = []
        for k in range(runs):
            seed = None if body.seed is None else body.seed + k  # each choice samples on its own
            job = prompts.job(
                p.ids, p.adapter, wanted, body.temperature, body.top_p, seed, body.stop_list(), body.ignore_eos
            )
            job = dataclasses.replace(
                job,
                logprobs=generated_logprobs,
                prompt_logprobs=body.logprobs if body.echo else None,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                logit_bias=biases,
            )
            group.append(choices.Choice(len(groups) * runs + k, p_index, job))
        groups.append(group)
    return _Request(body, found, groups)


async def _stream(
    bridge: Bridge, req: _Request, text: TokenText, cid: str, options: StreamOptions | None
) -> AsyncIterator[str]:
    """Server-sent chunks, one per event of any choice (each names its index); usage last if asked for (and on every
    chunk with continuous_usage_stats)."""
    created = int(time.time())
    include_usage = bool(options and options.include_usage)
    every = bool(options and options.continuous_usage_stats)
    model = req.model()
    states = req.states(text)
    try:
        async with choices.closing(choices.events(bridge, req.groups, ROUTE)) as events:
            async for c, ev in events:
                if ev.error:
                    yield sse(from_event(ev).body)
                    return
                st = states[c.index]
                added = req.update(st, ev)
                lp = st.logprobs.take() if st.logprobs is not None else None
                if added or st.finish or (lp and lp["tokens"]):
                    final = st.finish if ev.finish_reason else None
                    out = completion_chunk(cid, model, created, c.index, added, lp, final)
                    if every:
                        out["usage"] = usage_so_far(ev) | (
                            {"completion_tokens": 0, "total_tokens": ev.prompt_tokens} if req.scoring_only else {}
                        )
                    yield sse(out)
    except APIError as e:
        yield sse(e.body)
        return
    if include_usage:
        yield sse(
            {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": []}
            | {"usage": req.usage(states)}
        )
    yield sse("[DONE]")

"""HTTP load: real clients streaming answers from a running server, closed-loop and open-loop.

Every request streams (`"stream": true`), so time to first token is what a client sees. Requests
set `ignore_eos` so each one generates exactly `max_tokens` tokens: throughput then compares
scenarios on the same amount of work, whatever the adapters' answers would have been.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

# Questions of the kinds MedQuAD holds; a fixed pool so every scenario sends the same prompts.
_TOPICS = (
    "asthma",
    "glaucoma",
    "psoriasis",
    "anemia",
    "migraine",
    "gout",
    "hepatitis B",
    "Parkinson's disease",
    "cystic fibrosis",
    "Lyme disease",
    "osteoporosis",
    "celiac disease",
)
_FORMS = (
    "What are the symptoms of {} ?",
    "What are the treatments for {} ?",
    "What causes {} ?",
    "How to prevent {} ?",
)
QUESTIONS = tuple(form.format(topic) for topic in _TOPICS for form in _FORMS)


@dataclass(frozen=True)
class Job:
    adapter: str
    question: str
    max_tokens: int
    tag: str = ""
    """Which part of a scenario this request belongs to (e.g. 'short' or 'long')."""


@dataclass
class Result:
    job: Job
    start: float
    ttft: float | None = None
    """Seconds from sending to the first streamed event."""
    latency: float | None = None
    """Seconds from sending to the last event."""
    tokens: int = 0
    error: str | None = None
    streamed: int = 0
    """Events with text received so far (about one per generated token: text is held back only mid-character)."""
    unfinished: bool = False
    """Still waiting at a deadline: `latency` is the time it had waited, a lower bound."""


def jobs(
    adapters: Sequence[str],
    n: int,
    max_tokens: int,
    seed: int,
    weights: Sequence[float] | None = None,
    tag: str = "",
) -> list[Job]:
    """`n` requests over `adapters` (uniform, or by `weights`), questions drawn from the fixed pool."""
    rng = random.Random(seed)
    picks = rng.choices(list(adapters), weights=weights, k=n)
    return [Job(a, rng.choice(QUESTIONS), max_tokens, tag) for a in picks]


def zipf_weights(n: int, s: float = 1.1) -> list[float]:
    """Popularity of the k-th most used of `n` adapters under Zipf's law with exponent `s`."""
    return [1.0 / (k**s) for k in range(1, n + 1)]


@dataclass(frozen=True)
class Wire:
    """How a server is asked for one streamed answer and how its events read: loraswap's /v1/answer (`ANSWER`),
    or a peer's route (llama-server's, in `llamaserver.py`)."""

    route: str
    body: Callable[[Job], dict[str, Any]]
    text: Callable[[dict[str, Any]], bool]
    """Whether an event carries generated text."""
    tokens: Callable[[dict[str, Any]], int | None]
    """The completion tokens, read off the event that reports them (None from the others)."""


def _answer_body(job: Job) -> dict[str, Any]:
    return {
        "adapter": job.adapter,
        "question": job.question,
        "max_tokens": job.max_tokens,
        "stream": True,
        "ignore_eos": True,
    }


def _answer_tokens(event: dict[str, Any]) -> int | None:
    return int(event["usage"]["completion_tokens"]) if "usage" in event else None


ANSWER = Wire("/v1/answer", _answer_body, lambda event: bool(event.get("delta")), _answer_tokens)


async def send(client: httpx.AsyncClient, job: Job, res: Result | None = None, wire: Wire = ANSWER) -> Result:
    """One streamed request (`wire`: loraswap's /v1/answer unless told), timed (into `res`, which a caller may
    read while it streams). A stream ends at `[DONE]` or when the server closes it.

    A request the server closed without any response is sent once more (its time counts from the first try): a
    pooled keep-alive connection can be closed by the server just as the client reuses it (llama-server's HTTP
    library closes idle keep-alive connections after 5 s by default), and the server never saw that request."""
    res = res or Result(job, time.perf_counter())
    try:
        return await _send(client, job, res, wire)
    except httpx.RemoteProtocolError as e:
        with contextlib.suppress(httpx.RemoteProtocolError):
            return await _send(client, job, res, wire)
        res.error = f"{type(e).__name__}: {e} (and again when sent once more)"
        return res


async def _send(client: httpx.AsyncClient, job: Job, res: Result, wire: Wire) -> Result:
    """`send`'s one try; raises httpx.RemoteProtocolError where the server closed the connection before any
    response, the other HTTP errors go into `res.error`."""
    body = wire.body(job)
    answered = False
    try:
        async with client.stream("POST", wire.route, json=body) as resp:
            answered = True
            if resp.status_code != 200:
                await resp.aread()
                res.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                if res.ttft is None:
                    res.ttft = time.perf_counter() - res.start
                event = json.loads(data)
                if "error" in event:
                    res.error = str(event["error"].get("message", event["error"]))
                    return res
                if wire.text(event):
                    res.streamed += 1
                tokens = wire.tokens(event)
                if tokens is not None:
                    res.tokens = tokens
        res.latency = time.perf_counter() - res.start
        if res.tokens == 0:
            res.error = "stream ended without a result"
    except httpx.RemoteProtocolError as e:
        if not answered:
            raise
        res.error = f"{type(e).__name__}: {e}"
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


@dataclass
class Run:
    """The results of one load run and the wall time it took."""

    results: list[Result]
    wall: float
    background_streamed: int = 0
    """`with_background`: text events the background requests streamed while the foreground ran."""


def auth_headers(key: str | None) -> dict[str, str]:
    """The bearer header of an API or admin key (none without a key)."""
    return {"Authorization": f"Bearer {key}"} if key else {}


def client_for(url: str, api_key: str | None = None, connections: int = 256) -> httpx.AsyncClient:
    headers = auth_headers(api_key)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(600.0), limits=limits)


async def closed_loop(
    url: str, work: Sequence[Job], clients: int, api_key: str | None = None, wire: Wire = ANSWER
) -> Run:
    """`clients` concurrent clients, each sending its next request as soon as its last one finished,
    until `work` is done."""
    queue: Iterator[Job] = iter(work)
    results: list[Result] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        for job in queue:  # a shared iterator: each job is taken by exactly one client
            results.append(await send(client, job, wire=wire))

    async with client_for(url, api_key) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return Run(results, time.perf_counter() - start)


async def open_loop(url: str, work: Sequence[Job], rate: float, seed: int, api_key: str | None = None) -> Run:
    """Requests arriving as a Poisson process of `rate` per second, whatever the server's pace (no
    client waits for another): the load real traffic puts on a server."""
    rng = random.Random(seed)
    async with client_for(url, api_key) as client:
        start = time.perf_counter()
        tasks = []
        due = start
        for job in work:
            due += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(send(client, job)))
        results = list(await asyncio.gather(*tasks))
        return Run(results, time.perf_counter() - start)


async def with_background(
    url: str,
    work: Sequence[Job],
    clients: int,
    background: Callable[[int], Job],
    background_clients: int,
    api_key: str | None = None,
    wire: Wire = ANSWER,
    deadline: float | None = None,
) -> Run:
    """`work` through `clients` closed-loop clients while `background_clients` more keep sending
    `background(i)` jobs until `work` is done (then their requests in flight are dropped). The Run holds
    both kinds of result (tell them apart by `Job.tag`), and what the background streamed meanwhile, finished
    or not; its wall time is the foreground's. After `deadline` seconds the foreground stops too: a server that
    starves the foreground behind the background (llama-server serves one LoRA set at a time) would never let
    it finish. Its requests still waiting then are `Result.unfinished` (their time so far is a lower bound),
    those never sent are errors."""
    results: list[Result] = []
    front: list[Result] = []  # every foreground request, in flight or done
    behind: list[Result] = []  # every background request, in flight or done
    done = asyncio.Event()
    counter = iter(range(1 << 30))

    async with client_for(url, api_key) as client:

        async def fg(queue: Iterator[Job]) -> None:
            for job in queue:
                res = Result(job, time.perf_counter())
                front.append(res)
                results.append(res)
                await send(client, job, res, wire)

        async def bg() -> None:
            while not done.is_set():
                job = background(next(counter))
                res = Result(job, time.perf_counter())
                behind.append(res)
                results.append(await send(client, job, res, wire))

        bgs = [asyncio.create_task(bg()) for _ in range(background_clients)]
        await asyncio.sleep(0.5)  # the long requests are running before the short ones start
        start, streamed = time.perf_counter(), sum(r.streamed for r in behind)
        queue = iter(work)
        fgs = [asyncio.create_task(fg(queue)) for _ in range(clients)]
        _, late = await asyncio.wait(fgs, timeout=deadline)
        wall = time.perf_counter() - start
        streamed = sum(r.streamed for r in behind) - streamed
        done.set()
        for task in (*late, *bgs):
            task.cancel()
        await asyncio.gather(*late, *bgs, return_exceptions=True)
    now = time.perf_counter()
    for res in front:
        if res.latency is None and res.error is None:
            res.unfinished, res.latency = True, now - res.start
            res.error = f"not answered within the {deadline:.0f} s deadline"
    results += [Result(job, now, error=f"not sent within the {deadline:.0f} s deadline") for job in queue]
    return Run(results, wall, streamed)


def percentile(values: Sequence[float], q: float, digits: int | None = None) -> float | None:
    """The q-th percentile (0-100) by linear interpolation, rounded to `digits` if given; None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    p = s[lo] + (s[hi] - s[lo]) * (pos - lo)
    return p if digits is None else round(p, digits)


def summarize(runs: Sequence[Run], tag: str | None = None) -> dict[str, Any]:
    """Throughput over the runs' summed wall time, latency percentiles over all their requests (only
    those tagged `tag`, if given)."""
    results = [r for run in runs for r in run.results if tag is None or r.job.tag == tag]
    ok = [r for r in results if r.error is None]
    wall = sum(run.wall for run in runs)
    # A request still waiting at a deadline counts with the time it had waited (a lower bound): leaving it out
    # would make a server that starves requests look as fast as its luckiest ones.
    unfinished = [r for r in results if r.unfinished]
    lat = [1000 * r.latency for r in (*ok, *unfinished) if r.latency is not None]
    ttft = [1000 * r.ttft for r in ok if r.ttft is not None]

    failed = Counter(r.error for r in results if r.error and not r.unfinished)
    return {
        **({"error_samples": [f"{n} x {e}" for e, n in failed.most_common(3)]} if failed else {}),
        "req_s": round(len(ok) / wall, 3) if wall else None,
        "tok_s": round(sum(r.tokens for r in ok) / wall, 2) if wall else None,
        "p50_ms": percentile(lat, 50, 1),
        "p95_ms": percentile(lat, 95, 1),
        "p99_ms": percentile(lat, 99, 1),
        "ttft_p50_ms": percentile(ttft, 50, 1),
        "ttft_p95_ms": percentile(ttft, 95, 1),
        "errors": len(results) - len(ok) - len(unfinished),
        "unfinished": len(unfinished),
        "requests": len(results),
    }

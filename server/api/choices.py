"""A request's several jobs (a list of prompts, `n` choices of each) run on the workers as one stream of events.

The n jobs of one prompt share its prefill through the workers' prefix cache: the first runs at once, its siblings
are queued when its first event comes back (its prompt's blocks are in the cache by then), so each computes only
the prompt's last partial block before sampling on its own. Jobs of different prompts run at once. If the
consumer stops early (the client went away, or one job failed), every job still running is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from loraswap.server.api.bridge import Bridge
from loraswap.server.api.errors import APIError
from loraswap.server.jobs import Job, JobEvent

closing = contextlib.aclosing
"""Wrap `events(...)` in it: a consumer that stops early (returns) cancels every job still running."""


@dataclass(frozen=True)
class Choice:
    """One job of a request: its `index` among the response's choices, and the prompt it answers."""

    index: int
    prompt: int
    job: Job


async def events(
    bridge: Bridge, groups: list[list[Choice]], route: str
) -> AsyncGenerator[tuple[Choice, JobEvent], None]:
    """Every job's events, as they come, with the choice each belongs to; each group is one prompt's choices.
    A job the bridge fails (its worker failed) raises that APIError here."""
    queue: asyncio.Queue[tuple[Choice, JobEvent | APIError]] = asyncio.Queue()
    tasks: list[asyncio.Task[None]] = []

    def start(choice: Choice, then: Callable[[], None] | None = None) -> None:
        tasks.append(asyncio.get_running_loop().create_task(_pump(bridge, choice, route, queue.put, then)))

    def siblings(rest: list[Choice]) -> Callable[[], None]:
        def go() -> None:
            for c in rest:
                start(c)

        return go

    for group in groups:
        start(group[0], siblings(group[1:]) if len(group) > 1 else None)
    left = sum(len(g) for g in groups)
    try:
        while left:
            choice, item = await queue.get()
            if isinstance(item, APIError):
                raise item
            if item.finish_reason:
                left -= 1
            yield choice, item
    finally:
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(
    bridge: Bridge,
    choice: Choice,
    route: str,
    put: Callable[[tuple[Choice, JobEvent | APIError]], Awaitable[None]],
    then: Callable[[], None] | None,
) -> None:
    """One job's events onto the queue; `then()` once its first event has come (or it ended without one)."""
    try:
        job_events = cast(AsyncGenerator[JobEvent, None], bridge.events(choice.job, route))
        async with contextlib.aclosing(job_events):
            async for ev in job_events:
                if then is not None:
                    then()
                    then = None
                await put((choice, ev))
    except APIError as e:
        await put((choice, e))
    if then is not None:
        then()

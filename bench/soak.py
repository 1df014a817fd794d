"""`loraswap bench --soak`: minutes of mixed traffic with uploads and deletes; nothing may fail or leak.

Closed-loop clients send a mix of requests (answers and chat completions, streamed or not, over several
adapters, the base and "auto") together with requests that must be refused (an unknown adapter, broken
JSON, a max_tokens over the limit). Beside them an admin loop uploads an adapter, asks it a question while
deleting it, and overwrites one of the adapters the clients use. Every response is checked against what
it should be; anything else is an unexpected error.

Resources are measured with no request in flight (traffic pauses while they are read): after the warm-up
and at the end, for every process of a server started here (resident memory, open file descriptors,
threads), and sampled under load along the way for the chart. The soak passes with zero unexpected
errors, resident memory within 5% of the warm-up figure, and no more descriptors or threads at the end.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loraswap.bench.load import QUESTIONS, auth_headers
from loraswap.bench.probes import server_processes, totals
from loraswap.bench.session import Session, say

RSS_TOLERANCE = 0.05


@dataclass
class SoakConfig:
    url: str | None = None
    """A running server to soak; None starts one (resources are measured only then)."""
    base: str = "embedded"
    quant: str = "nf4"
    double_quant: bool = True
    max_batch_size: int = 16
    seconds: float = 180.0
    """Length of the whole soak, warm-up included."""
    warmup_fraction: float = 0.25
    clients: int = 8
    max_tokens: int = 16
    adapters: int = 8
    api_key: str | None = None
    admin_key: str | None = None
    sample_seconds: float = 5.0
    seed: int = 0


@dataclass
class SoakStats:
    requests: Counter[str] = field(default_factory=Counter)
    """Requests by kind."""
    unexpected: list[str] = field(default_factory=list)
    """What went wrong, one line each (the first 50 kept)."""
    unexpected_count: int = 0
    samples: list[dict[str, float]] = field(default_factory=list)
    """Under load: {"t": seconds, "rss_mb": total resident memory}."""
    in_flight: int = 0

    def fail(self, what: str) -> None:
        self.unexpected_count += 1
        if len(self.unexpected) < 50:
            self.unexpected.append(what)


async def _expect(stats: SoakStats, kind: str, client: httpx.AsyncClient, body: Any, path: str, status: int) -> None:
    """Send one request that must be answered with `status` (an OpenAI error body for a 4xx)."""
    stats.requests[kind] += 1
    try:
        if isinstance(body, bytes):
            r = await client.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = await client.post(path, json=body)
    except httpx.HTTPError as e:
        stats.fail(f"{kind}: {type(e).__name__}: {e}")
        return
    if r.status_code != status:
        stats.fail(f"{kind}: HTTP {r.status_code} (expected {status}): {r.text[:200]}")
    elif status >= 400 and set(r.json().get("error", {})) != {"message", "type", "param", "code"}:
        stats.fail(f"{kind}: error body not in OpenAI's shape: {r.text[:200]}")
    elif status == 200 and not body.get("stream") and "usage" not in r.json():
        stats.fail(f"{kind}: no usage in {r.text[:200]}")


async def _stream(stats: SoakStats, kind: str, client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> None:
    """A streamed request that must end with [DONE] after a final event with usage."""
    stats.requests[kind] += 1
    try:
        events = []
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                stats.fail(f"{kind}: HTTP {r.status_code}: {r.text[:200]}")
                return
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        if events[-1:] != ["[DONE]"] or '"usage"' not in events[-2]:
            stats.fail(f"{kind}: the stream ended with {events[-2:]}")
    except (httpx.HTTPError, IndexError) as e:
        stats.fail(f"{kind}: {type(e).__name__}: {e}")


def _traffic(rng: random.Random, names: list[str], max_tokens: int) -> tuple[str, str, Any, int | None]:
    """One request of the mix: (kind, path, body, expected status; None for a stream)."""
    adapter = rng.choice([*names, "base", "auto"])
    question = rng.choice(QUESTIONS)
    n = rng.randint(1, max_tokens)
    answer = {"adapter": adapter, "question": question, "max_tokens": n}
    chat: dict[str, Any] = {"model": adapter if adapter != "auto" else "base"}
    chat["messages"] = [{"role": "user", "content": question}]
    chat["max_tokens"] = n
    roll = rng.random()
    if roll < 0.30:
        return "answer", "/v1/answer", answer, 200
    if roll < 0.55:
        return "answer-stream", "/v1/answer", {**answer, "stream": True}, None
    if roll < 0.70:
        return "chat", "/v1/chat/completions", chat, 200
    if roll < 0.85:
        return (
            "chat-stream",
            "/v1/chat/completions",
            {**chat, "stream": True, "stream_options": {"include_usage": True}},
            None,
        )
    if roll < 0.90:
        return "unknown-adapter", "/v1/answer", {**answer, "adapter": "no-such-adapter"}, 404
    if roll < 0.95:
        return "broken-json", "/v1/chat/completions", b'{"model": "base", "messages": [', 400
    return "max-tokens-over-limit", "/v1/answer", {**answer, "max_tokens": 10**9}, 400


async def _client(
    stats: SoakStats,
    client: httpx.AsyncClient,
    cfg: SoakConfig,
    names: list[str],
    k: int,
    running: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    rng = random.Random(cfg.seed * 1000 + k)
    while not stop.is_set():
        await running.wait()
        if stop.is_set():
            return
        kind, path, body, status = _traffic(rng, names, cfg.max_tokens)
        stats.in_flight += 1
        try:
            if status is None:
                await _stream(stats, kind, client, path, body)
            else:
                await _expect(stats, kind, client, body, path, status)
        finally:
            stats.in_flight -= 1


async def _admin(
    stats: SoakStats,
    client: httpx.AsyncClient,
    ask: httpx.AsyncClient,
    cfg: SoakConfig,
    names: list[str],
    folders: dict[str, Path],
    running: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    """Upload a fresh adapter, stream an answer from it while deleting it (the answer must finish), and
    overwrite one of the adapters the clients use."""
    from loraswap.bench.synth import archive

    i = 0
    while not stop.is_set():
        await running.wait()
        if stop.is_set():
            return
        stats.in_flight += 1
        try:
            name = f"soak-churn-{i % 4}"
            data = archive(folders["churn"])
            stats.requests["upload"] += 1
            r = await client.post("/v1/adapters", data={"name": name}, files={"file": ("a.tar.gz", data)})
            if r.status_code != 201:
                stats.fail(f"upload {name}: HTTP {r.status_code}: {r.text[:200]}")
                continue
            stats.requests["delete-in-flight"] += 1
            body = {"adapter": name, "question": QUESTIONS[i % len(QUESTIONS)], "max_tokens": cfg.max_tokens,
                    "stream": True, "ignore_eos": True}  # fmt: skip
            events: list[str] = []
            async with ask.stream("POST", "/v1/answer", json=body) as s:
                async for line in s.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 1:
                            d = await client.delete(f"/v1/adapters/{name}")
                            if d.status_code != 204:
                                stats.fail(f"delete {name}: HTTP {d.status_code}: {d.text[:200]}")
            if events[-1:] != ["[DONE]"] or f'"completion_tokens": {cfg.max_tokens}' not in events[-2]:
                stats.fail(f"answer during delete of {name} ended with {events[-2:]}")
            target = names[i % len(names)]
            stats.requests["overwrite"] += 1
            r = await client.post(
                "/v1/adapters",
                data={"name": target, "overwrite": "true"},
                files={"file": ("a.tar.gz", archive(folders[target if i % 2 else "churn"]))},
            )
            if r.status_code != 201:
                stats.fail(f"overwrite {target}: HTTP {r.status_code}: {r.text[:200]}")
        except (httpx.HTTPError, IndexError) as e:
            stats.fail(f"admin loop: {type(e).__name__}: {e}")
        finally:
            stats.in_flight -= 1
            i += 1
        await asyncio.sleep(0.2)


async def _quiesce(stats: SoakStats, running: asyncio.Event) -> None:
    """Pause the traffic and wait until no request is in flight."""
    running.clear()
    while stats.in_flight:
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # let the server finish its bookkeeping


async def _soak(
    cfg: SoakConfig, url: str, names: list[str], folders: dict[str, Path], pid: int | None, port: int | None
) -> dict[str, Any]:
    stats = SoakStats()
    running, stop = asyncio.Event(), asyncio.Event()
    running.set()
    inference = auth_headers(cfg.api_key)
    admin = auth_headers(cfg.admin_key)
    limits = httpx.Limits(max_connections=cfg.clients + 4)
    timeout = httpx.Timeout(300.0)
    measured: dict[str, Any] = {}
    async with (
        httpx.AsyncClient(base_url=url, headers=inference, timeout=timeout, limits=limits) as client,
        httpx.AsyncClient(base_url=url, headers=admin, timeout=timeout) as admin_client,
        httpx.AsyncClient(base_url=url, headers=inference, timeout=timeout) as ask_client,
    ):
        tasks = [asyncio.create_task(_client(stats, client, cfg, names, k, running, stop)) for k in range(cfg.clients)]
        tasks.append(asyncio.create_task(_admin(stats, admin_client, ask_client, cfg, names, folders, running, stop)))
        start = time.monotonic()
        warm_until = start + cfg.seconds * cfg.warmup_fraction
        end = start + cfg.seconds
        next_sample = start
        while time.monotonic() < end:
            now = time.monotonic()
            if pid is not None and now >= next_sample:
                stats.samples.append({"t": round(now - start, 1), **totals(server_processes(pid))})
                next_sample = now + cfg.sample_seconds
            if "warmup" not in measured and now >= warm_until:
                await _quiesce(stats, running)
                if pid is not None:
                    measured["warmup"] = server_processes(pid, port)
                    say(f"soak: warm-up done at {now - start:.0f} s: {totals(measured['warmup'])}")
                else:
                    measured["warmup"] = []
                measured["warmup_requests"] = sum(stats.requests.values())
                running.set()
            await asyncio.sleep(0.25)
        await _quiesce(stats, running)
        if pid is not None:
            measured["end"] = server_processes(pid, port)
            say(f"soak: end at {time.monotonic() - start:.0f} s: {totals(measured['end'])}")
        stop.set()
        running.set()
        await asyncio.gather(*tasks)
    return summarize(cfg, stats, measured, time.monotonic() - start)


def summarize(cfg: SoakConfig, stats: SoakStats, measured: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The soak's numbers and its verdict."""
    result: dict[str, Any] = {
        "seconds": round(seconds, 1),
        "requests": sum(stats.requests.values()),
        "requests_after_warmup": sum(stats.requests.values()) - measured.get("warmup_requests", 0),
        "by_kind": dict(sorted(stats.requests.items())),
        "unexpected_errors": stats.unexpected_count,
        "errors": stats.unexpected,
        "config": {k: v for k, v in asdict(cfg).items() if "key" not in k},
        "samples": stats.samples,
    }
    warm, end = measured.get("warmup") or [], measured.get("end") or []
    checks = {"no unexpected errors": stats.unexpected_count == 0}
    if warm and end:
        w, e = totals(warm), totals(end)
        growth = (e["rss_mb"] - w["rss_mb"]) / w["rss_mb"]
        result["resources"] = {
            "warmup": w,
            "end": e,
            "rss_growth_pct": round(100 * growth, 2),
            "processes_warmup": warm,
            "processes_end": end,
        }
        checks[f"resident memory within {RSS_TOLERANCE:.0%} of warm-up"] = abs(growth) <= RSS_TOLERANCE
        checks["no file descriptors leaked"] = e["fds"] <= w["fds"]
        checks["no threads leaked"] = e["threads"] <= w["threads"]
    result["checks"] = checks
    result["passed"] = all(checks.values())
    return result


def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    """Start a server (unless `cfg.url`), upload the adapters, soak it, stop it (or delete its adapters)."""
    names = [f"soak-{i:02d}" for i in range(cfg.adapters)]
    with Session(cfg.base, cfg.url, cfg.admin_key, label="soak: ") as session:
        folders = session.synthesise([*names, "churn"])
        env = {"LORASWAP_MAX_TOKENS": str(max(cfg.max_tokens, 64))}
        if cfg.api_key:
            env["LORASWAP_API_KEY"] = cfg.api_key
        if cfg.admin_key:
            env["LORASWAP_ADMIN_KEY"] = cfg.admin_key
        url = session.start(cfg.quant, cfg.max_batch_size, env, double_quant=cfg.double_quant)
        session.owns([f"soak-churn-{i}" for i in range(4)])  # the admin loop's uploads
        for n in names:
            session.upload(n, folders[n])
        say(f"soak: {cfg.seconds:.0f} s of traffic from {cfg.clients} clients plus uploads and deletes")
        proc = session.proc
        port = int(url.rsplit(":", 1)[1]) if proc is not None else None
        return asyncio.run(_soak(cfg, url, names, folders, proc.pid if proc else None, port))

"""The LitServe server: one base per worker, adapters chosen per request, an OpenAI-compatible API.

Two kinds of process, as LitServe runs them:
- one API process (uvicorn) runs every route (`server/api/`: `spec.py` registers them, `routes/`) and
  validates each request before it is queued as a `Job` (`server/jobs.py`);
- worker processes each hold the base and an engine (the worker side's `LoraswapAPI`, which takes the spec
  built here), and answer with `JobEvent`s.

Uploads and deletes change the shared store on disk (atomic renames), so every worker sees them on
its next request; nothing about adapters is kept only in one process's memory.

Faults: LitServe restarts a worker that dies (`restart_workers`), and the API process ends the requests
that worker had taken with a 503 (`bridge.py`); if the API process itself dies, `serve` stops everything and
returns a non-zero status, for a process manager to restart. At start-up the store is recovered from
any crash and every adapter is checked; those that fail are reported and not served.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any

import litserve as ls
from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel

from loraswap.adapters.manifest import NAME_PATTERN
from loraswap.server.api.errors import install_handlers
from loraswap.server.api.protocol import AnswerRequest, ChatRequest
from loraswap.server.api.protocol_completions import CompletionRequest
from loraswap.server.api.routes import lora, playground
from loraswap.server.api.spec import LoraswapSpec
from loraswap.server.settings import Settings
from loraswap.server.worker.api import LoraswapAPI

__all__ = ["build_server", "report_store", "serve"]


def report_store(settings: Settings) -> dict[str, str]:
    """At start-up: finish what a crash left in the user directory, check every adapter of this base in full
    (files, weights, shapes, checksums), and say what will be served. Returns the adapters that failed,
    with the reason: they are reported and skipped (not listed, requests for them get a 404 saying why)."""
    from loraswap.adapters.base import resolve_base
    from loraswap.adapters.manifest import recover
    from loraswap.adapters.validate import validate_adapter

    ref = resolve_base(settings.base)
    store = settings.store(with_registry=False)  # registry adapters are checked in full as they are pulled
    for line in recover(store.user_dir):
        print(f"loraswap: store recovery: {line}", file=sys.stderr)
    entries = store.entries()
    mine = sorted(n for n, e in entries.items() if e.manifest.base_fingerprint == ref.fingerprint)
    unusable = store.problems()
    for name in mine:
        problems = validate_adapter(entries[name].path, ref, max_rank=settings.max_rank)
        if problems:
            unusable[name] = "; ".join(problems)
    ours = [n for n in mine if n not in unusable]
    print(
        f"loraswap: base {ref.base_id} ({ref.fingerprint}, {settings.quant}), {len(ours)} adapters: "
        f"{', '.join(ours) or 'none'}",
        file=sys.stderr,
    )
    others = sorted(set(entries) - set(mine))
    if others:
        print(f"loraswap: skipping adapters of other bases: {', '.join(others)}", file=sys.stderr)
    for name, why in sorted(unusable.items()):
        print(f"loraswap: skipping unusable adapter folder {name!r}: {why}", file=sys.stderr)
    return unusable


def build_server(
    settings: Settings, cancels: Any = None, workers: Any = None, unusable: dict[str, str] | None = None
) -> ls.LitServer:
    spec = LoraswapSpec(settings, cancels, workers, unusable)
    api = LoraswapAPI(settings, spec=spec, cancels=cancels, workers=workers)
    middlewares: list[Any] = []
    if settings.cors_origins:  # browser pages of these origins may call the API; preflights answered here
        from starlette.middleware.cors import CORSMiddleware

        cors = {"allow_origins": settings.cors_origins, "allow_methods": ["*"], "allow_headers": ["*"]}
        middlewares.append((CORSMiddleware, cors | {"max_age": 600}))
    server = ls.LitServer(
        api,
        accelerator="auto",
        workers_per_device=settings.workers,
        timeout=False,
        restart_workers=True,  # a worker that dies is started again (its requests get a 503: bridge.py)
        max_payload_size=max(settings.max_upload_bytes, settings.max_body_bytes) + (1 << 20),
        middlewares=middlewares,
    )
    install_handlers(server.app)
    _document_bodies(server.app)
    # LitServe registers its own "/" ("litserve running") ahead of the spec's routes; the first match
    # wins, so it is dropped for the playground's page.
    routes = server.app.router.routes
    routes[:] = [r for r in routes if getattr(r, "path", "") != "/" or getattr(r, "endpoint", None) is playground.page]
    for route in routes:  # HEAD /health, as load balancers and uptime checks send it (same answer, no body)
        if isinstance(route, APIRoute) and route.path == "/health" and route.methods is not None:
            route.methods.add("HEAD")
    return server


def _document_bodies(app: FastAPI) -> None:
    """Describe the request bodies in /openapi.json: the routes read the raw request (to answer bad bodies
    with their own errors), so FastAPI cannot see them."""
    json_bodies: dict[str, type[BaseModel]] = {
        "/v1/chat/completions": ChatRequest,
        "/v1/answer": AnswerRequest,
        "/v1/load_lora_adapter": lora.LoadLoRAAdapterRequest,
        "/v1/unload_lora_adapter": lora.UnloadLoRAAdapterRequest,
        "/v1/completions": CompletionRequest,
    }
    upload = {
        "type": "object",
        "required": ["name", "file"],
        "properties": {
            "name": {"type": "string", "pattern": f"^{NAME_PATTERN}$"},
            "file": {"type": "string", "format": "binary", "description": ".tar.gz or .zip of an adapter folder"},
            "overwrite": {"type": "string", "enum": ["true", "false"]},
        },
    }
    shared: dict[str, Any] = {}  # nested models (Message, StreamOptions) go to components/schemas
    for route in app.routes:
        if not isinstance(route, APIRoute) or "POST" not in (route.methods or ()):
            continue
        if route.path in json_bodies:
            schema = json_bodies[route.path].model_json_schema(ref_template="#/components/schemas/{model}")
            shared.update(schema.pop("$defs", {}))
            content = {"application/json": {"schema": schema}}
        elif route.path == "/v1/adapters":
            content = {"multipart/form-data": {"schema": upload}}
        else:
            continue
        route.openapi_extra = {"requestBody": {"required": True, "content": content}}
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            build().setdefault("components", {}).setdefault("schemas", {}).update(shared)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


def serve(settings: Settings) -> int:
    """Run the server until SIGINT or SIGTERM; the exit status (0, or 1 when the API process died).

    On SIGTERM (LitServe ignores it), the API process is asked to stop first: uvicorn closes the
    listening socket and lets running requests finish, for up to `drain_seconds`, while the workers
    still answer them; then LitServe shuts the workers down, and every process is gone.
    """
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # Worker processes start after this and read it at start-up: glibc's per-thread malloc arenas keep
    # what an adapter load's temporary buffers freed, so without a bound resident memory grew by 2.5x
    # an adapter's weights per loaded adapter (1.0x with the bound; see BENCHMARKS.md).
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    unusable = report_store(settings)
    # Cancels cross from the API process to whichever worker runs the request through a shared dict; the
    # workers' process ids go the other way.
    manager = multiprocessing.Manager()
    server = build_server(settings, manager.dict(), manager.dict(), unusable)
    server.uvicorn_graceful_timeout = settings.drain_seconds  # uvicorn's own graceful-shutdown bound
    stopping = threading.Event()
    api_died = threading.Event()

    api: list[Any] = []  # the API processes, as LitServe starts them
    start_api = server._start_server

    def started(*args: Any, **kwargs: Any) -> Any:
        processes = start_api(*args, **kwargs)
        api.extend(processes.values())
        return processes

    server._start_server = started

    def watch_api() -> None:
        """LitServe restarts workers but not the API process: if it dies, nothing answers any more, so stop
        everything and exit non-zero, for a process manager (systemd, Docker, Kubernetes) to restart."""
        while not stopping.wait(1):
            if api and not all(p.is_alive() for p in api) and not stopping.is_set():
                print("loraswap: the API process died; stopping the server", file=sys.stderr, flush=True)
                api_died.set()
                if server._shutdown_event is not None:
                    server._shutdown_event.set()
                return

    def drain() -> None:
        stopping.set()
        api_servers = [p for p in multiprocessing.active_children() if p.name.startswith("LitServer-")]
        for p in api_servers:
            if p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + settings.drain_seconds + 5
        for p in api_servers:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        server._shutdown_event.set()

    main_pid = os.getpid()

    def on_sigterm(*_: Any) -> None:
        # Processes forked after this (LitServe's own manager, which holds the request queues) inherit the handler:
        # a SIGTERM to the whole process group (systemd, `kill -- -PGID`) leaves the shutdown to this process,
        # which keeps them until running requests are done.
        if os.getpid() == main_pid:
            threading.Thread(target=drain, daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    threading.Thread(target=watch_api, daemon=True, name="loraswap-api-watch").start()
    # One API process: every response passes through it, so one metrics registry sees all of them.
    try:
        server.run(
            host=settings.host,
            port=settings.port,
            num_api_servers=1,
            generate_client_file=False,
            log_level="warning",
        )
    finally:
        stopping.set()
        manager.shutdown()
    return 1 if api_died.is_set() else 0

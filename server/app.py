"""The LitServe server: one base per worker, adapters chosen per request, an OpenAI-compatible API.

Two kinds of process, as LitServe runs them:
- one API process (uvicorn) runs every route (`spec.py`) and validates each request before it is
  queued;
- worker processes each hold the base and an `Engine` (`worker.py`, `engine.py`).

Uploads and deletes change the shared store on disk (atomic renames), so every worker sees them on
its next request; nothing about adapters is kept only in one process's memory.
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

from loraswap.server import playground
from loraswap.server.settings import Settings
from loraswap.server.worker import LoraswapAPI

__all__ = ["Settings", "build_server", "serve"]


def report_store(settings: Settings) -> None:
    """Say at start-up what will be served, and which folders of the store cannot be (they are skipped)."""
    from loraswap.adapters.base import resolve_base

    ref = resolve_base(settings.base)
    store = settings.store()
    entries = store.entries()
    ours = sorted(n for n, e in entries.items() if e.manifest.base_fingerprint == ref.fingerprint)
    print(
        f"loraswap: base {ref.base_id} ({ref.fingerprint}), {len(ours)} adapters: {', '.join(ours) or 'none'}",
        file=sys.stderr,
    )
    others = sorted(set(entries) - set(ours))
    if others:
        print(f"loraswap: skipping adapters of other bases: {', '.join(others)}", file=sys.stderr)
    for name, why in store.problems().items():
        print(f"loraswap: skipping unusable adapter folder {name!r}: {why}", file=sys.stderr)


def build_server(settings: Settings, cancels: Any = None) -> ls.LitServer:
    api = LoraswapAPI(settings, cancels)
    server = ls.LitServer(
        api,
        accelerator="auto",
        workers_per_device=settings.workers,
        timeout=False,
        max_payload_size=max(settings.max_upload_bytes, settings.max_body_bytes) + (1 << 20),
    )
    # LitServe registers its own "/" ("litserve running") ahead of the spec's routes; the first match
    # wins, so it is dropped for the playground's page.
    routes = server.app.router.routes
    routes[:] = [r for r in routes if getattr(r, "path", "") != "/" or getattr(r, "endpoint", None) is playground.page]
    return server


def serve(settings: Settings) -> None:
    """Run the server until SIGINT or SIGTERM.

    On SIGTERM (LitServe ignores it), the API process is asked to stop first: uvicorn closes the
    listening socket and lets running requests finish, for up to `drain_seconds`, while the workers
    still answer them; then LitServe shuts the workers down, and every process is gone.
    """
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # Worker processes start after this and read it at start-up: glibc's per-thread malloc arenas keep
    # what an adapter load's temporary buffers freed, so without a bound resident memory grew by 2.5x
    # an adapter's weights per loaded adapter (1.0x with the bound; see BENCHMARKS.md).
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    report_store(settings)
    # Cancels cross from the API process to whichever worker runs the request through a shared dict.
    manager = multiprocessing.Manager()
    server = build_server(settings, manager.dict())
    server.uvicorn_graceful_timeout = settings.drain_seconds  # uvicorn's own graceful-shutdown bound

    def drain() -> None:
        api_servers = [p for p in multiprocessing.active_children() if p.name.startswith("LitServer-")]
        for p in api_servers:
            if p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + settings.drain_seconds + 5
        for p in api_servers:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        server._shutdown_event.set()

    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=drain, daemon=True).start())
    # One API process: every response passes through it, so one metrics registry sees all of them.
    server.run(
        host=settings.host,
        port=settings.port,
        num_api_servers=1,
        generate_client_file=False,
        log_level="warning",
    )
    manager.shutdown()

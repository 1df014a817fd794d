"""The replica deployment: a whole `loraswap serve` per replica, and the requests the proxy sends it.

Each replica starts `loraswap serve` (`child.py`) on a free loopback port with the application's settings, waits until
it answers /health, and forwards every request to it over HTTP: the same routes, batching, LoRA slots, prefix cache,
auth and errors as a server started by hand. The caller's address goes along in X-Forwarded-For, so the server's
loopback rule for admin routes still sees remote callers as remote.

Adapter affinity: a request for an adapter arrives with its name as Ray Serve's multiplexed model id. Serve keeps an
LRU of the ids each replica holds (`max_num_models_per_replica`, set to the engine's `max_loaded_adapters`) and routes
an id to a replica that holds it. Here an id is held by a `Hold`: taking one makes the adapter present on this replica
(a registry adapter is pulled now, the listing refreshed if it is not known yet, so an upload on another replica is
served at once); a name this replica cannot serve is refused and never becomes Serve's (its request still gets the
server's own 404). Serve evicts a hold by calling its `__del__`, sometimes twice and even while a stream on it runs:
`Hold.release` is idempotent and frees nothing itself. The weights stay in the engine's LRU, which refcounts running
requests and evicts only what none uses, so the engine stays the authority on what is loaded.

What the proxy gets back is a `Head` (status and headers), then the body: one piece for a plain response (so a replica
lost before it is complete still gives the client a clean 503), or the server-sent events as they come.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from loraswap.server.api.errors import APIError
from loraswap.server.api.protocol import sse
from loraswap.server.settings import Settings

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding"}
    | {"upgrade", "host", "content-length", "date", "server"}
)
"""Headers that belong to one HTTP connection, not to the request or response carried over it."""
REPORT_SECONDS = 1.0
"""How often a replica reports its server's metrics to the directory."""
SECRETS = ("api_key", "admin_key")
"""Settings that never travel in the application's arguments: each replica reads them from its own environment."""


@dataclass
class Forwarded:
    """A request as the proxy received it."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    client: str


@dataclass
class Head:
    """The status and headers of a replica's answer; `stream`: the body follows piece by piece (server-sent events)."""

    status: int
    headers: list[tuple[str, str]]
    stream: bool
    replica: str
    body: bytes | None = None


@dataclass
class Hold:
    """Serve's record that this replica holds an adapter. `running`: requests on it now."""

    name: str
    running: int = 0
    released: bool = False

    def release(self) -> None:
        """Idempotent, and frees nothing: the engine's LRU keeps the weights while any request runs on them (those
        `running` here among them) and evicts them only when it needs the room."""
        self.released = True

    def __del__(self) -> None:  # what Serve's LRU calls on eviction (and the garbage collector after it)
        self.release()


def free_port() -> int:
    """A TCP port free on the loopback address now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(settings: Settings, port: int, replica: str) -> dict[str, str]:
    """The environment of a replica's server: this process's, with LORASWAP_* replaced by `settings` (the secrets
    kept from this process's own environment) and LORASWAP_RAY_REPLICA naming the replica (for logs and tools)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASWAP_")}
    for key in SECRETS:
        if f"LORASWAP_{key.upper()}" in os.environ:
            env[f"LORASWAP_{key.upper()}"] = os.environ[f"LORASWAP_{key.upper()}"]
    values = settings.model_dump(mode="json", exclude=set(SECRETS)) | {"host": "127.0.0.1", "port": port}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, list):
            value = ",".join(map(str, value))
        env[f"LORASWAP_{name.upper()}"] = str(value)
    env["LORASWAP_RAY_REPLICA"] = replica
    return env


class Replica:
    """One replica: its server (a child process), the holds Serve's LRU keeps, and its metrics reports."""

    def __init__(self, settings: dict[str, Any], directory: Any = None, start_timeout: float = 600) -> None:
        from ray import serve

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.settings = Settings.from_env(**{k: v for k, v in settings.items() if k not in SECRETS})
        self.cache_dir = None
        if self.settings.registry and self.settings.registry_cache_dir is None:
            # Replicas on one node never share a cache folder: each server keeps its own byte-bounded LRU of it.
            default = self.settings.registry_dir()
            assert default is not None
            self.cache_dir = default / f"replica-{self.replica_id}"
            self.settings = self.settings.model_copy(update={"registry_cache_dir": self.cache_dir})
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loraswap.server.cluster.child", str(os.getpid())],
            env=child_env(self.settings, port, self.replica_id),
            start_new_session=True,  # its own process group: stopped as a whole
        )
        self.client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(None, connect=10))
        self._wait_healthy(start_timeout)
        self.max_holds = self.settings.max_loaded_adapters

        async def take(name: str) -> Hold:  # a plain function: Serve keeps its LRU on the function object
            return await self._take(name)

        self._hold = serve.multiplexed(max_num_models_per_replica=self.max_holds)(take)
        self.directory = directory
        self._stop = threading.Event()
        if directory is not None:
            threading.Thread(target=self._report, daemon=True, name="loraswap-metrics-report").start()

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the replica's server exited with status {self.proc.returncode} while starting")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        self._stop_child()
        raise RuntimeError(f"the replica's server was not healthy within {timeout:.0f} s")

    def _auth(self, admin: bool = False) -> dict[str, str]:
        """The key this replica's own calls to its server need (none where the server asks for none)."""
        key = self.settings.admin_key if admin else self.settings.api_key
        return {"authorization": f"Bearer {key.get_secret_value()}"} if key is not None else {}

    async def _take(self, name: str) -> Hold:
        """Serve's loader of a model id: make `name` present here (pulled from the registry now if it is one), or
        refuse it (raised: Serve keeps nothing, and the request gets the server's own answer)."""
        if self.settings.registry:
            body = {"lora_name": name, "lora_path": self.settings.registry}
            r = await self.client.post("/v1/load_lora_adapter", json=body, headers=self._auth(admin=True))
            if r.status_code in (200, 400):  # pulled now, or already held here
                return Hold(name)
        r = await self.client.get(f"/v1/models/{name}", headers=self._auth())
        if r.status_code == 200:
            return Hold(name)
        raise LookupError(f"this replica cannot serve adapter {name!r} (HTTP {r.status_code})")

    async def hold(self, name: str) -> Hold | None:
        try:
            return await self._hold(name)
        except LookupError:
            return None

    async def handle(self, req: Forwarded) -> AsyncIterator[Head | bytes]:
        """Forward `req` to this replica's server: a `Head`, then (for a stream) the body's pieces."""
        from ray import serve

        name = serve.get_multiplexed_model_id()
        held = await self.hold(name) if name else None
        if held is not None:
            held.running += 1
        headers = [(k, v) for k, v in req.headers if k.lower() not in HOP_BY_HOP and k.lower() != "x-forwarded-for"]
        forwarded_for = ", ".join([v for k, v in req.headers if k.lower() == "x-forwarded-for"] + [req.client])
        headers.append(("x-forwarded-for", forwarded_for))
        url = req.path + (f"?{req.query}" if req.query else "")
        try:
            request = self.client.build_request(req.method, url, headers=headers, content=req.body)
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError:
            if held is not None:
                held.running -= 1
            yield self._lost("the replica's server did not answer; retry")
            return
        try:
            out = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in HOP_BY_HOP]
            out.append(("x-loraswap-replica", self.replica_id))
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                body = await response.aread()
                yield Head(response.status_code, out, False, self.replica_id, body)
                return
            yield Head(response.status_code, out, True, self.replica_id)
            try:
                async for piece in response.aiter_raw():
                    yield piece
            except httpx.HTTPError:
                yield sse(_lost_body("the replica's server stopped during this answer; retry")).encode()
        finally:
            await response.aclose()
            if held is not None:
                held.running -= 1

    def _lost(self, message: str) -> Head:
        import json

        body = json.dumps(_lost_body(message)).encode()
        return Head(503, [("content-type", "application/json")], False, self.replica_id, body)

    async def base_names(self) -> list[str]:
        """The names that mean the base on this replica's server: its base's id (no parent in /v1/models)."""
        r = await self.client.get("/v1/models", headers=self._auth())
        r.raise_for_status()
        return [m["id"] for m in r.json()["data"] if not m.get("parent")]

    def check_health(self) -> None:
        """Serve's health check: the server answers /health (else Serve replaces this replica)."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"the replica's server exited with status {self.proc.returncode}")
        r = httpx.get(f"{self.url}/health", timeout=10)
        if r.status_code != 200:
            raise RuntimeError(f"the replica's server answered /health with {r.status_code}")

    def _report(self) -> None:
        """Send the server's /metrics to the directory every REPORT_SECONDS, until stopped."""
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.wait(REPORT_SECONDS):
                with contextlib.suppress(Exception):  # a missed report is retried on the next tick
                    text = client.get("/metrics", headers=self._auth()).text
                    self.directory.report.remote(self.replica_id, text).result(timeout_s=10)

    def _stop_child(self) -> None:
        """SIGTERM the server's process group (it drains for up to drain_seconds), then SIGKILL what is left."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=self.settings.drain_seconds + 10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def __del__(self) -> None:
        """Serve's shutdown of this replica (after its running requests finished or the graceful timeout)."""
        if not hasattr(self, "proc"):
            return
        if hasattr(self, "_stop"):
            self._stop.set()
        self._stop_child()
        if self.cache_dir is not None:
            shutil.rmtree(self.cache_dir, ignore_errors=True)


def _lost_body(message: str) -> dict[str, Any]:
    return APIError(503, message, code="replica_lost").body

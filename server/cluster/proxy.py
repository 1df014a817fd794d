"""The ingress deployment: every HTTP request of the application comes here first (from Ray Serve's HTTP proxy) and
goes on to one replica.

A generation request (`/v1/chat/completions` and `/v1/completions` by `model`, `/v1/answer` by `adapter`) that names
an adapter goes with that name as Serve's multiplexed model id, so Serve's router prefers a replica that already
holds it (then the one holding the fewest, then any). The base, "auto" (the adapter is chosen on the replica),
mixtures and hub names carry none and spread over every replica, as does every other route.

Failures: a replica lost before its answer starts (killed, its node gone) gives the client a 503 in OpenAI's shape
(`replica_lost`, retry); one lost during a stream ends the stream with that error as a last event, as the server
does when one of its own workers dies. Ray replaces the replica; other requests are not affected.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from loraswap.adapters.manifest import NAME_PATTERN
from loraswap.server.api.auth import authorize
from loraswap.server.api.catalog import BASE_NAMES
from loraswap.server.api.errors import APIError
from loraswap.server.api.protocol import sse
from loraswap.server.cluster.directory import merge
from loraswap.server.cluster.replica import SECRETS, Forwarded, Head
from loraswap.server.settings import Settings

log = logging.getLogger(__name__)

MODEL_FIELD = {"/v1/chat/completions": "model", "/v1/completions": "model", "/v1/answer": "adapter"}
"""Routes whose body names the adapter, and the field that does."""


def adapter_of(path: str, body: bytes, base_names: set[str], limit: int) -> str:
    """The adapter a request names, as a multiplexed model id; "" for the base, "auto", mixtures, hub names, other
    routes and bodies that do not parse (the replica answers those with its own 400)."""
    field = MODEL_FIELD.get(path)
    if field is None or len(body) > limit:
        return ""
    try:
        value = json.loads(body).get(field)
    except (ValueError, AttributeError):
        return ""
    if not isinstance(value, str) or value in base_names or value in BASE_NAMES or value == "auto":
        return ""
    return value if re.fullmatch(NAME_PATTERN, value) else ""


def lost(message: str) -> APIError:
    return APIError(503, message, code="replica_lost")


class Proxy:
    """Reads each request, picks its multiplexed model id, and relays the replica's answer."""

    def __init__(self, replicas: Any, directory: Any, settings: dict[str, Any]) -> None:
        self.replicas = replicas
        self.directory = directory
        self.settings = Settings.from_env(**{k: v for k, v in settings.items() if k not in SECRETS})
        self.limit = max(self.settings.max_upload_bytes, self.settings.max_body_bytes) + (1 << 20)
        self.base_names: set[str] | None = None

    async def __call__(self, request: Request) -> Response:
        if request.url.path == "/metrics" and request.method == "GET":
            return await self.metrics(request)
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        name = ""
        if request.url.path in MODEL_FIELD:
            name = adapter_of(request.url.path, body, await self._base_names(), self.settings.max_body_bytes)
        forwarded = Forwarded(
            request.method,
            request.url.path,
            request.url.query,
            list(request.headers.items()),
            body,
            request.client.host if request.client else "",
        )
        stream = self.replicas.options(multiplexed_model_id=name, stream=True).handle.remote(forwarded)
        try:
            head = await stream.__anext__()
        except Exception as e:
            return self._failed(e).response()
        if not isinstance(head, Head):
            return APIError(500, "the replica answered out of order").response()
        if not head.stream:
            return Response(head.body, status_code=head.status, headers=dict(head.headers))

        async def relay() -> Any:
            try:
                async for piece in stream:
                    yield piece
            except Exception as e:  # the replica was lost mid-stream
                yield sse(self._failed(e).body)
            finally:
                stream.cancel()  # a client gone: the replica's server drops the request too

        return StreamingResponse(relay(), status_code=head.status, headers=dict(head.headers))

    async def _body(self, request: Request) -> bytes | Response:
        """The whole body, or a 413 once it passes the largest body the server accepts (an upload)."""
        too_large = APIError(
            413, "request body is too large; LORASWAP_MAX_UPLOAD_BYTES sets the limit", code="payload_too_large"
        )
        if int(request.headers.get("content-length") or 0) > self.limit:
            return too_large.response()
        pieces, size = [], 0
        async for piece in request.stream():
            size += len(piece)
            if size > self.limit:
                return too_large.response()
            pieces.append(piece)
        return b"".join(pieces)

    async def _base_names(self) -> set[str]:
        """The base's own id (asked of a replica once): requests naming it carry no model id."""
        if self.base_names is None:
            try:
                self.base_names = set(await self.replicas.base_names.remote())
            except Exception:  # no replica answered yet: treat only the fixed names as the base this time
                return set()
        return self.base_names

    @staticmethod
    def _failed(e: Exception) -> APIError:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        if isinstance(e, ActorDiedError | ActorUnavailableError | RayActorError):
            return lost("the replica serving this request stopped; it is being replaced, retry")
        if isinstance(e, BackPressureError | DeploymentUnavailableError):
            return lost(f"no replica can take this request now ({type(e).__name__}); retry")
        log.error("a replica failed a request", exc_info=e)
        return APIError(500, "internal error; the replica's log has the details")

    async def metrics(self, request: Request) -> Response:
        """Every replica's metrics, each sample labelled with its `replica` (`directory.py`)."""
        try:
            authorize(request, self.settings)
        except APIError as e:
            return e.response()
        reports = await self.directory.snapshot.remote()
        return Response(merge(reports), media_type="text/plain; version=0.0.4")

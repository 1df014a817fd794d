"""Every error the API answers with, in OpenAI's shape, and every mapping to an HTTP status, once.

- `APIError`: an HTTP error with the body {"error": {"message", "type", "param", "code"}}; its message never
  carries the server's file-system paths (`scrub_paths`).
- `KIND_STATUS`: a failed job's `ErrorKind` (what a worker reports, `server/jobs.py`) -> its status. Workers
  never name a status; this table is the only place a kind becomes one.
- `from_validation`, `from_install`, `from_remove`, `from_form`, `from_registry`: library exceptions (pydantic,
  the adapter store and registry, starlette's form parser) -> their status and message.
- `install_handlers`: errors raised outside the routes (an unknown path, a wrong method, a body over LitServe's
  payload limit, an unexpected exception) get the same body.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraswap.adapters.manifest import AdapterError, AdapterNotFound
from loraswap.server.jobs import ErrorKind, JobEvent

log = logging.getLogger(__name__)

ErrorType = Literal[
    "invalid_request_error", "authentication_error", "permission_error", "not_found_error", "server_error"
]

KIND_STATUS: dict[ErrorKind, int] = {
    "adapter_not_found": 404,  # the adapter left the store after the request was accepted
    "invalid_job": 400,  # the job does not fit the engine (the API process checks this first)
    "generation_failed": 500,
    "worker_lost": 503,  # the worker running the job died; it is being restarted: retry
}
"""A failed job's kind -> the HTTP status its client gets."""


@functools.cache
def _server_paths() -> re.Pattern[str]:
    """Absolute paths under any top-level folder of this machine ("/home/...", "/tmp/...", "/usr/...")."""
    try:
        tops = sorted((d for d in os.listdir("/") if re.fullmatch(r"[\w.-]+", d)), key=len, reverse=True)
    except OSError:
        tops = ["home", "tmp", "usr", "var", "root", "opt", "etc", "srv", "mnt"]
    return re.compile(r"(?<![\w/.:-])/(?:" + "|".join(map(re.escape, tops)) + r")(?=/|\b)(?:/[^\s'\",;()\[\]{}<>]*)*")


def scrub_paths(message: str) -> str:
    """`message` without file-system paths of the server: each is cut to its last part (the file name), which
    says what is wrong without telling a client how the server's disks are laid out."""
    return _server_paths().sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "<path>", message)


def error_type(status: int) -> ErrorType:
    return {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )  # type: ignore[return-value]


class APIError(HTTPException):
    """An error with an OpenAI-shaped body: {"error": {"message", "type", "param", "code"}}. Messages never
    carry the server's file-system paths."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: ErrorType | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        message = scrub_paths(message)
        super().__init__(status_code=status, detail=message)
        self.body = {"error": {"message": message, "type": type_ or error_type(status), "param": param, "code": code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status_code)


def from_event(ev: JobEvent) -> APIError:
    """The error a failed job's last event describes, with the status of its kind."""
    if ev.error_kind is None:
        # The contract (server/jobs.py) has every error event name its kind; one without is a worker's bug.
        log.error("job %s failed without an error kind, answered as generation_failed: %s", ev.uid, ev.error)
    return APIError(KIND_STATUS[ev.error_kind or "generation_failed"], ev.error or "generation failed")


def from_validation(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """400 naming the first field at fault (`errors`: pydantic's or FastAPI's `.errors()`)."""
    err = errors[0] if errors else {}
    param = ".".join(str(p) for p in err.get("loc", ())) or None
    message = str(err.get("msg", "invalid request"))
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


def from_form(e: StarletteHTTPException) -> APIError:
    """starlette's multipart parser refused the body: a part over the size limit (413), or a malformed form."""
    status = 413 if "maximum size" in str(e.detail) else 400
    return APIError(status, f"the upload is not a valid multipart form: {e.detail}", param="file")


def from_name(e: AdapterError) -> APIError:
    """An adapter name that is not a valid name."""
    return APIError(400, str(e), param="name", code="invalid_name")


def from_install(e: Exception, name: str) -> APIError:
    """An uploaded adapter the store did not take: the name is taken (409), the adapter fails validation (422),
    or the store's disk failed (507 when full, else 500; said without paths)."""
    from loraswap.adapters.registry import RegistryError

    if isinstance(e, RegistryError):
        return from_registry(e)
    if isinstance(e, FileExistsError):
        return APIError(
            409, f"adapter {name!r} exists; send overwrite=true to replace it", param="name", code="adapter_exists"
        )
    if isinstance(e, AdapterError):
        return APIError(422, str(e), param="file", code="invalid_adapter")
    if isinstance(e, OSError):
        log.error("upload of %r failed", name, exc_info=e)
        status = 507 if e.errno == errno.ENOSPC else 500
        return APIError(status, f"the adapter could not be stored: {e.strerror}")
    raise TypeError(f"no HTTP status for {type(e).__name__} from an upload; expected an AdapterError or OSError")


def from_registry(e: Exception, param: str | None = None) -> APIError:
    """The adapter registry failed: unreachable or refusing (503, retry later), a publish that lost a race (409),
    or an adapter in it that is corrupt, tampered or invalid (502: the registry's content is at fault, not the
    request). The messages carry no credentials (`adapters/registry.py`)."""
    from loraswap.adapters.registry import AdapterRefused, RegistryConflict, RegistryUnavailable

    if isinstance(e, RegistryUnavailable):
        from loraswap.adapters.hub import HubUnavailable

        code = "hub_unavailable" if isinstance(e, HubUnavailable) else "registry_unavailable"
        return APIError(503, str(e), param=param, code=code)
    if isinstance(e, RegistryConflict):
        return APIError(409, str(e), param="name", code="adapter_exists")
    if isinstance(e, AdapterRefused):
        return APIError(502, str(e), param=param, code="adapter_refused")
    raise TypeError(f"no HTTP status for {type(e).__name__} from the registry")


def from_remove(e: AdapterError) -> APIError:
    """A delete the store refused: no such adapter (404), or a shipped one, which is read-only (403)."""
    return APIError(404 if isinstance(e, AdapterNotFound) else 403, str(e), param="name")


def install_handlers(app: FastAPI) -> None:
    """Errors raised outside loraswap's routes (an unknown path, a wrong method, a body over LitServe's
    payload limit, an unexpected exception) get the same OpenAI error body as the routes' own."""
    from fastapi.exceptions import RequestValidationError

    async def http_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, APIError):
            return exc.response()
        if not isinstance(exc, StarletteHTTPException):
            raise TypeError(f"the HTTP error handler got a {type(exc).__name__}")
        if exc.status_code == 413:  # LitServe's payload limit, before a route reads the body
            message = "request body is too large; LORASWAP_MAX_BODY_BYTES and _MAX_UPLOAD_BYTES set the limits"
            return APIError(413, message, code="payload_too_large").response()
        return APIError(exc.status_code, str(exc.detail)).response()

    async def validation_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, RequestValidationError):
            raise TypeError(f"the validation error handler got a {type(exc).__name__}")
        return from_validation(exc.errors()).response()

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return APIError(500, "internal error; the server log has the details").response()

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)

"""The API side: every route, run in the API process (uvicorn).

Requests are validated here before anything is queued: an unknown adapter, a bad field or a prompt
over the context is answered with its own 4xx and never reaches (or fails) a batch. Generation jobs
go to the workers through LitServe's request queue; their events come back through its response
buffer. The adapter routes only touch the store on disk.
"""

from __future__ import annotations

import asyncio
import difflib
import errno
import hmac
import inspect
import ipaddress
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from pydantic import BaseModel, SecretStr, ValidationError
from starlette.exceptions import HTTPException

from loraswap.adapters.base import BaseRef, load_tokenizer, resolve_base
from loraswap.adapters.manifest import AdapterError, AdapterNotFound, check_name
from loraswap.adapters.prompt import SYSTEM_PROMPT, render_chat
from loraswap.adapters.store import StoreEntry
from loraswap.server import playground
from loraswap.server.jobs import ErrorKind, Job, failed
from loraswap.server.metrics import Metrics
from loraswap.server.protocol import (
    AnswerRequest,
    APIError,
    ChatRequest,
    chat_chunk,
    chat_completion,
    from_validation,
    new_id,
    sse,
    usage,
)
from loraswap.server.settings import Settings

BASE_NAMES = ("base", "__base__")
WATCH_SECONDS = 0.5
"""How often the API process checks that the workers running its requests are alive."""

log = logging.getLogger(__name__)
T = TypeVar("T")


def _check_key(request: Request, key: SecretStr | None) -> bool:
    if key is None:
        return False
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {key.get_secret_value()}".encode())


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a killed worker stays a zombie until LitServe reaps it)."""
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _error_event(message: str, kind: ErrorKind) -> dict[str, Any]:
    """A worker-style final event carrying an error (for requests the API process itself has to end)."""
    return failed("", message, kind).to_wire()


_STATUS: dict[str | None, int] = {
    "adapter_not_found": 404,
    "invalid_job": 400,
    "generation_failed": 500,
    "worker_lost": 503,
}


def _status(event: dict[str, Any]) -> int:
    """The HTTP status of a failed job's event, by its error kind."""
    return _STATUS.get(event.get("error_kind"), 500)


class LoraswapSpec(LitSpec):
    def __init__(
        self, settings: Settings, cancels: Any = None, workers: Any = None, unusable: dict[str, str] | None = None
    ) -> None:
        super().__init__()
        self.settings = settings
        self.cancels = cancels  # shared dict (multiprocessing manager) of uids whose client went away
        self.workers = workers  # shared dict: LitServe worker index -> process id of the worker
        self.unusable = dict(unusable or {})  # adapters that failed the start-up check: name -> why
        self.api_path = "/v1/chat/completions"
        self._tokenizer: Any = None
        self._ref: BaseRef | None = None
        self._metrics: Metrics | None = None
        self._max_token_bytes = 0
        self._prompts: ThreadPoolExecutor | None = None  # one thread builds prompts (tokenizers are not thread-safe)
        self._watchdog: asyncio.Task[None] | None = None
        self._loaded: dict[int, set[str]] = {}  # worker pid -> adapter names it reported loaded
        self._router: tuple[tuple[str, int], Any] | None = None
        routes = [
            ("/v1/chat/completions", self.chat, "POST"),
            ("/v1/answer", self.answer, "POST"),
            ("/v1/models", self.models, "GET"),
            ("/v1/adapters", self.list_adapters, "GET"),
            ("/v1/adapters", self.upload, "POST"),
            ("/v1/adapters/{name}", self.delete, "DELETE"),
        ]
        for path, handler, method in routes:
            self.add_endpoint(path, self._tracked(path, handler), [method])
        self.add_endpoint("/metrics", self.metrics_route, ["GET"])
        # The browser playground (server/playground.py); app.build_server drops LitServe's own "/".
        self.add_endpoint("/", playground.page, ["GET"])
        self.add_endpoint("/playground/{name}", playground.asset, ["GET"])

    @property
    def stream(self) -> bool:
        return True  # every response comes from the worker as a stream of events

    def decode_request(self, request: Any, context_kwargs: Any = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: Any = None) -> Any:
        return output

    # -- shared pieces --

    @property
    def metrics(self) -> Metrics:
        # Created on first use, in the API process: the spec is also pickled into workers, and metric
        # objects (locks) do not pickle.
        if self._metrics is None:
            self._metrics = Metrics()
        return self._metrics

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_metrics"] = None
        state["_prompts"] = state["_watchdog"] = None
        state["_endpoints"] = []  # routes live in the API process; workers only need the settings
        return state

    def _tracked(self, route: str, handler: Any) -> Any:
        """Count every response of `handler` by route, adapter (set on request.state) and status."""

        async def run(request: Request, *args: Any, **kwargs: Any) -> Response:
            response: Response = await handler(request, *args, **kwargs)
            adapter = getattr(request.state, "adapter", "-")
            self.metrics.requests.labels(route, adapter, str(response.status_code)).inc()
            if response.status_code >= 400:
                self.metrics.errors.labels(route, adapter).inc()
            return response

        run.__signature__ = inspect.signature(handler)  # type: ignore[attr-defined]  # FastAPI reads parameters
        return run

    async def metrics_route(self, request: Request) -> Response:
        try:
            self._auth(request)  # metrics name adapters: they need the inference key when one is set
        except APIError as e:
            return e.response()
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    @property
    def ref(self) -> BaseRef:
        if self._ref is None:
            self._ref = resolve_base(self.settings.base)
        return self._ref

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.ref)
            vocab = self._tokenizer.get_vocab()
            # No token covers more bytes of text than its own spelling takes (byte-level and sentencepiece
            # spellings are at least as long as the bytes they stand for).
            self._max_token_bytes = max((len(t.encode()) for t in vocab), default=1) or 1
        return self._tokenizer

    @property
    def context(self) -> int:
        return int(self.ref.arch.get("max_position_embeddings", 2048))

    def _check_text_fits(self, nbytes: int, param: str) -> None:
        """Refuse, without tokenizing it, text too long for the context whatever its tokens: tokenizing a
        megabyte costs the API process a second that every other request would wait for."""
        _ = self.tokenizer  # loaded first: it measures the longest token
        if nbytes > self.context * self._max_token_bytes:
            raise APIError(
                400,
                f"the prompt has {nbytes} bytes of text, more than the context length of {self.context} tokens "
                "can hold",
                param=param,
                code="context_length_exceeded",
            )

    async def _in_prompt_thread(self, fn: Callable[[], T]) -> T:
        """Run `fn` (chat templates, tokenizing) off the event loop, one at a time."""
        if self._prompts is None:
            self._prompts = ThreadPoolExecutor(1, thread_name_prefix="loraswap-prompts")
        return await asyncio.get_running_loop().run_in_executor(self._prompts, fn)

    def _entries(self) -> dict[str, StoreEntry]:
        fp = self.ref.fingerprint
        return {
            n: e
            for n, e in self.settings.store().entries().items()
            if e.manifest.base_fingerprint == fp and n not in self.unusable
        }

    def _adapter(self, name: str, param: str) -> str | None:
        """None for the base; the adapter's name if it exists for this base; else 404 with close names."""
        if name in BASE_NAMES or name == self.ref.base_id:
            return None
        if name in self.unusable:
            raise APIError(
                404,
                f"adapter {name!r} is not served: it failed the start-up check ({self.unusable[name]}); "
                "upload it again with overwrite=true, or delete it",
                param=param,
                code="adapter_unusable",
            )
        try:
            if self.settings.store().get(name).manifest.base_fingerprint == self.ref.fingerprint:
                return name  # the common case reads one folder, not the whole store
        except AdapterNotFound:
            pass
        entries = self._entries()
        close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        listed = sorted(entries)[:20] + (["..."] if len(entries) > 20 else [])
        raise APIError(
            404,
            f"adapter {name!r} not found{hint} (available: base, {', '.join(listed)}; GET /v1/models lists all)",
            "not_found_error",
            param=param,
            code="model_not_found",
        )

    def _auth(self, request: Request, admin: bool = False) -> None:
        s = self.settings
        if admin:
            if s.admin_key is not None:
                if not _check_key(request, s.admin_key):
                    raise APIError(
                        401,
                        "admin routes need 'Authorization: Bearer <admin key>'",
                        "authentication_error",
                        code="invalid_api_key",
                    )
                return
            # Behind a reverse proxy on this host, uvicorn takes the caller from X-Forwarded-For (it trusts the
            # header from 127.0.0.1 only), so remote callers are seen as remote.
            host = request.client.host if request.client else ""
            if not _is_loopback(host):
                raise APIError(
                    403,
                    "adapter upload and delete are only accepted from the loopback address "
                    "unless LORASWAP_ADMIN_KEY is set",
                    "permission_error",
                )
            return
        if s.api_key is not None and not (_check_key(request, s.api_key) or _check_key(request, s.admin_key)):
            raise APIError(
                401,
                "this server needs 'Authorization: Bearer <api key>'",
                "authentication_error",
                code="invalid_api_key",
            )

    async def _body(self, request: Request, model: type[BaseModel]) -> Any:
        raw = await request.body()
        if len(raw) > self.settings.max_body_bytes:
            raise APIError(
                413,
                f"request body is {len(raw)} bytes, too large; the limit is {self.settings.max_body_bytes}",
                code="payload_too_large",
            )
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
            raise APIError(400, f"body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "body must be a JSON object", code="invalid_json")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise from_validation(e) from None

    def _job(
        self,
        prompt: list[int],
        adapter: str | None,
        max_tokens: int | None,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: tuple[str, ...],
        ignore_eos: bool = False,
    ) -> dict[str, Any]:
        limit = self.settings.max_tokens
        wanted = max_tokens or limit
        if wanted > limit:
            raise APIError(
                400,
                f"max_tokens is {wanted}; this server allows at most {limit}",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        context = self.context
        if len(prompt) + 1 > context:
            raise APIError(
                400,
                f"the prompt is {len(prompt)} tokens; the context length is {context}",
                param="messages",
                code="context_length_exceeded",
            )
        return {
            "prompt_ids": prompt,
            "adapter": adapter,
            "max_tokens": wanted,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "stop": stop,
            "ignore_eos": ignore_eos,
        }

    async def _events(self, job: dict[str, Any], route: str) -> AsyncIterator[dict[str, Any]]:
        """Queue `job` for a worker and yield its events until it finishes. If the consumer stops early
        (the client disconnected), the worker is told to drop the request."""
        adapter = job["adapter"] or "base"
        start = time.perf_counter()
        first = True
        uid = uuid.uuid4()
        q: deque[Any] = deque()
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event, response_queue=q)
        self._watch_workers()
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), Job(uid=str(uid), **job)))
        finished = False
        try:
            async for data, status in self.data_streamer(q, event, send_status=True):
                if status == LitAPIStatus.ERROR:
                    finished = True
                    raise APIError(500, "the inference worker failed on this request")
                item = json.loads(data) if isinstance(data, str) else data
                m = self.metrics
                m.event(item)
                if item.get("loaded_names") is not None:
                    self._loaded[int(item["worker"])] = set(item["loaded_names"])
                if first and (item.get("text") or item.get("finish_reason")):
                    m.ttft.labels(route, adapter).observe(time.perf_counter() - start)
                    first = False
                if item.get("finish_reason"):
                    finished = True
                    m.latency.labels(route, adapter).observe(time.perf_counter() - start)
                    m.tokens.labels(adapter).inc(int(item.get("completion_tokens") or 0))
                    m.prompt_tokens.inc(int(item.get("prompt_tokens") or 0))
                    m.cached_tokens.inc(int(item.get("cached_tokens") or 0))
                    if item.get("error"):
                        m.errors.labels(route, adapter).inc()
                yield item
        finally:
            self.response_buffer.pop(uid, None)  # LitServe's own spec leaks this entry (litserve#452)
            if not finished:
                # Whichever worker runs it sees this at its next step (the queue cannot address a worker).
                if self.cancels is not None:
                    self.cancels[str(uid)] = time.monotonic()
                self.metrics.cancelled.inc()

    def _watch_workers(self) -> None:
        """Start, once per API process, the task that ends requests whose worker died."""
        if self._watchdog is None and self.workers is not None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Every WATCH_SECONDS: a request a worker has taken (LitServe records which, as the request starts)
        whose worker process is gone gets a 503 at once; LitServe restarts the worker, and requests still
        queued wait for it. Without this they would wait for their lost worker forever."""
        seen: dict[Any, int] = {}  # uid -> pid of the worker that took it
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            taken = [(uid, item) for uid, item in list(self.response_buffer.items()) if item.worker_id is not None]
            seen = {uid: pid for uid, pid in seen.items() if uid in self.response_buffer}
            if not taken:
                continue
            try:
                pids = dict(self.workers)  # one round trip to the manager
            except Exception:  # the manager is going away (shutdown)
                continue
            for uid, item in taken:
                pid = seen.setdefault(uid, pids.get(item.worker_id, 0))
                if pid and not _alive(pid):
                    log.warning("worker %s (pid %s) died; failing its request %s", item.worker_id, pid, uid)
                    self.response_buffer.pop(uid, None)
                    message = "the inference worker running this request stopped; it is being restarted, retry"
                    if item.response_queue is not None:
                        item.response_queue.append((_error_event(message, "worker_lost"), LitAPIStatus.OK))
                    item.event.set()

    # -- routes --

    async def chat(self, request: Request) -> Response:
        try:
            self._auth(request)
            body: ChatRequest = await self._body(request, ChatRequest)
            adapter = self._adapter(body.model, "model")
            request.state.adapter = adapter or "base"  # only known names become labels
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            self._check_text_fits(sum(len(m["content"].encode()) for m in messages), "messages")
            if messages[0]["role"] not in ("system", "developer"):
                messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
            prompt = await self._in_prompt_thread(lambda: self._chat_prompt(messages))
            job = self._job(
                prompt,
                adapter,
                body.limit(),
                body.temperature,
                body.top_p,
                body.seed,
                body.stop_list(),
                body.ignore_eos,
            )
        except APIError as e:
            return e.response()
        cid = new_id("chatcmpl")
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._chat_stream(job, cid, body.model, include), media_type="text/event-stream")
        return await self._collect(
            job, "/v1/chat/completions", lambda text, fin, use: chat_completion(cid, body.model, text, fin, use)
        )

    def _chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        from jinja2 import TemplateError

        try:
            text = render_chat(self.tokenizer, messages)
        except TemplateError as e:  # templates may refuse some role orders
            raise APIError(400, f"the base's chat template refuses these messages: {e}", param="messages") from None
        self._check_text_fits(len(text.encode()), "messages")  # many short messages add up in the template
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    async def _chat_stream(self, job: dict[str, Any], cid: str, model: str, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        yield sse(chat_chunk(cid, model, created, {"role": "assistant", "content": ""}, None))
        try:
            async for ev in self._events(job, "/v1/chat/completions"):
                if ev.get("error"):
                    yield sse(APIError(_status(ev), ev["error"]).body)
                    return
                if ev["text"]:
                    yield sse(chat_chunk(cid, model, created, {"content": ev["text"]}, None))
                if ev["finish_reason"]:
                    reason = "length" if ev["finish_reason"] == "length" else "stop"
                    yield sse(chat_chunk(cid, model, created, {}, reason))
                    if include_usage:
                        chunk = chat_chunk(cid, model, created, {}, None) | {
                            "choices": [],
                            "usage": usage(ev),
                        }
                        yield sse(chunk)
        except APIError as e:
            yield sse(e.body)
            return
        yield sse("[DONE]")

    async def _collect(self, job: dict[str, Any], route: str, build: Any) -> Response:
        parts: list[str] = []
        try:
            async for ev in self._events(job, route):
                if ev.get("error"):
                    return APIError(_status(ev), ev["error"]).response()
                parts.append(ev["text"])
                if ev["finish_reason"]:
                    reason = "length" if ev["finish_reason"] == "length" else "stop"
                    return JSONResponse(build("".join(parts), reason, usage(ev)))
        except APIError as e:
            return e.response()
        return APIError(500, "generation ended without a result").response()

    async def answer(self, request: Request) -> Response:
        try:
            self._auth(request)
            body: AnswerRequest = await self._body(request, AnswerRequest)
            self._check_text_fits(len(body.question.encode()), "question")
            routed = None
            if body.adapter == "auto":
                adapter, routed = self._route(body.question)
            else:
                adapter = self._adapter(body.adapter, "adapter")
            request.state.adapter = adapter or "base"
            from loraswap.adapters.prompt import prompt_ids

            question = body.question
            job = self._job(
                await self._in_prompt_thread(lambda: prompt_ids(self.tokenizer, question)),
                adapter,
                body.max_tokens,
                body.temperature,
                body.top_p,
                None,
                (),
                body.ignore_eos,
            )
        except APIError as e:
            return e.response()
        aid = new_id("ans")
        head: dict[str, Any] = {"id": aid, "adapter": adapter or "base"}
        if routed:
            head["routed"] = routed
        if body.stream:
            return StreamingResponse(self._answer_stream(job, head), media_type="text/event-stream")
        return await self._collect(
            job,
            "/v1/answer",
            lambda text, fin, use: {**head, "answer": text, "finish_reason": fin, "usage": use},
        )

    def _route(self, question: str) -> tuple[str | None, dict[str, Any]]:
        """adapter 'auto': the router's qtype, served by an adapter of that qtype (the base if none)."""
        from loraswap.adapters.router import Router

        path = self.settings.store().router_path()
        if path is None:
            raise APIError(
                400,
                "adapter 'auto' needs a router (loraswap train-router); none is installed",
                param="adapter",
                code="no_router",
            )
        key = (str(path), path.stat().st_mtime_ns)
        if self._router is None or self._router[0] != key:
            self._router = (key, Router.load(path))
        qtype, prob = self._router[1].predict(question)
        names = sorted(
            n for n, e in self._entries().items() if e.manifest.qtype == qtype and e.manifest.method == "lora"
        )
        return (names[0] if names else None), {"qtype": qtype, "probability": round(prob, 4)}

    async def _answer_stream(self, job: dict[str, Any], head: dict[str, Any]) -> AsyncIterator[str]:
        try:
            async for ev in self._events(job, "/v1/answer"):
                if ev.get("error"):
                    yield sse(APIError(_status(ev), ev["error"]).body)
                    return
                out: dict[str, Any] = {**head, "delta": ev["text"]}
                if ev["finish_reason"]:
                    out["finish_reason"] = "length" if ev["finish_reason"] == "length" else "stop"
                    out["usage"] = usage(ev)
                yield sse(out)
        except APIError as e:
            yield sse(e.body)
            return
        yield sse("[DONE]")

    async def models(self, request: Request) -> Response:
        try:
            self._auth(request)
        except APIError as e:
            return e.response()
        base = self.ref.base_id
        data = [{"id": base, "object": "model", "created": 0, "owned_by": "loraswap", "parent": None, **self._quant}]
        for name, entry in sorted(self._entries().items()):
            created = int(entry.path.stat().st_mtime)
            data.append({"id": name, "object": "model", "created": created, "owned_by": "loraswap", "parent": base})
        return JSONResponse({"object": "list", "data": data})

    @property
    def _quant(self) -> dict[str, Any]:
        """How the workers hold the base (reported with the base's entry of /v1/models)."""
        s = self.settings
        return {"quant": s.quant, "double_quant": s.double_quant if s.quant in ("nf4", "fp4") else None}

    async def list_adapters(self, request: Request) -> Response:
        try:
            self._auth(request)
        except APIError as e:
            return e.response()
        loaded = set().union(*self._loaded.values())
        data = [{**entry.describe(), "loaded": name in loaded} for name, entry in self._entries().items()]
        return JSONResponse({"object": "list", "data": data})

    async def upload(self, request: Request) -> Response:
        from loraswap.adapters.archive import install_archive

        limit = self.settings.max_upload_bytes
        try:
            self._auth(request, admin=True)
            try:
                form = await request.form(max_part_size=limit)
            except HTTPException as e:  # starlette's multipart parser: malformed body, or a part over the limit
                status = 413 if "maximum size" in str(e.detail) else 400
                raise APIError(status, f"the upload is not a valid multipart form: {e.detail}", param="file") from None
            name, upload, overwrite = form.get("name"), form.get("file"), form.get("overwrite", "false")
            if not isinstance(name, str) or not name:
                raise APIError(400, "form field 'name' is required", param="name")
            try:
                check_name(name)
            except AdapterError as e:
                raise APIError(400, str(e), param="name", code="invalid_name") from None
            if upload is None or isinstance(upload, str):
                raise APIError(400, "form field 'file' must be a .tar.gz or .zip upload", param="file")
            data = await upload.read(limit + 1)
            if len(data) > limit:
                raise APIError(413, f"archive is over the {limit}-byte limit", param="file", code="payload_too_large")
            store = self.settings.store()
            try:
                path = await asyncio.to_thread(
                    install_archive,
                    data,
                    name,
                    store.user_dir,
                    self.ref,
                    str(overwrite).lower() == "true",
                    self.settings.max_rank,
                    limit,
                )
            except FileExistsError:
                raise APIError(
                    409,
                    f"adapter {name!r} exists; send overwrite=true to replace it",
                    param="name",
                    code="adapter_exists",
                ) from None
            except AdapterError as e:
                raise APIError(422, str(e), param="file", code="invalid_adapter") from None
            except OSError as e:  # the store's disk (full, read-only): the server's problem, said without paths
                log.exception("upload of %r failed", name)
                status = 507 if e.errno == errno.ENOSPC else 500
                raise APIError(status, f"the adapter could not be stored: {e.strerror}") from None
            self.unusable.pop(name, None)
            entry = StoreEntry(name, path, "user", store.get(name).manifest)
        except APIError as e:
            return e.response()
        return JSONResponse(entry.describe(), status_code=201)

    async def delete(self, request: Request, name: str) -> Response:
        try:
            self._auth(request, admin=True)
            store = self.settings.store()
            try:
                check_name(name)
            except AdapterError as e:
                raise APIError(400, str(e), param="name", code="invalid_name") from None
            try:
                store.remove(name)
            except AdapterNotFound as e:
                raise APIError(404, str(e), param="name") from None
            except AdapterError as e:
                raise APIError(403, str(e), param="name") from None
            self.unusable.pop(name, None)
        except APIError as e:
            return e.response()
        return Response(status_code=204)

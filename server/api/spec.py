"""`LoraswapSpec`: the LitSpec that registers loraswap's routes and holds what they share.

Requests are validated in the API process before anything is queued: an unknown adapter, a bad field or a
prompt over the context is answered with its own 4xx and never reaches (or fails) a batch. Generation jobs go
to the workers through LitServe's request queue (`bridge.py`); the adapter routes only touch the store on disk.

The spec is also pickled into every worker (LitServe sends the LitAPI, spec included); there it only passes the
jobs through (`decode_request`, `encode_response`), and its routes are dropped.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request, Response
from litserve.specs.base import LitSpec

from loraswap.server.api.bridge import Bridge
from loraswap.server.api.catalog import Catalog
from loraswap.server.api.metrics import Metrics
from loraswap.server.api.prompts import Prompts
from loraswap.server.api.routes import adapters, answer, chat, completions, lora, models, playground
from loraswap.server.api.routes import metrics as metrics_route
from loraswap.server.settings import Settings

Handler = Callable[..., Awaitable[Response]]


class LoraswapSpec(LitSpec):
    """`cancels` and `workers`: dicts shared with the workers (a multiprocessing manager's), see `Bridge`;
    `unusable`: adapters that failed the start-up check, name -> why (`app.report_store`)."""

    def __init__(
        self, settings: Settings, cancels: Any = None, workers: Any = None, unusable: dict[str, str] | None = None
    ) -> None:
        super().__init__()
        self.settings = settings
        self.api_path = chat.ROUTE
        self.metrics = Metrics(settings.base, settings.max_loaded_adapters, settings.max_batch_size * settings.workers)
        self.catalog = Catalog(settings, unusable, self.metrics.pull_time.observe)
        self.prompts = Prompts(settings, self.catalog)
        self.bridge = Bridge(self, self.metrics, cancels, workers)
        c, p, b = self.catalog, self.prompts, self.bridge
        tracked: list[tuple[str, Handler, str]] = [
            (chat.ROUTE, _bind(chat.chat, c, p, b), "POST"),
            (completions.ROUTE, _bind(completions.completions, c, p, b), "POST"),
            (answer.ROUTE, _bind(answer.answer, c, p, b), "POST"),
            ("/v1/models", _bind(models.models, c), "GET"),
            ("/v1/models/{model_id:path}", _bind(models.model, c), "GET"),
            ("/v1/adapters", _bind(adapters.list_adapters, c, b), "GET"),
            ("/v1/adapters", _bind(adapters.upload, c), "POST"),
            ("/v1/adapters/{name}", _bind(adapters.delete, c), "DELETE"),
            ("/v1/load_lora_adapter", _bind(lora.load, c), "POST"),
            ("/v1/unload_lora_adapter", _bind(lora.unload, c), "POST"),
        ]
        for path, handler, method in tracked:
            self.add_endpoint(path, self._tracked(path, handler), [method])
        self.add_endpoint("/metrics", _bind(metrics_route.metrics, settings, self.metrics), ["GET"])
        # The browser playground; app.build_server drops LitServe's own "/".
        self.add_endpoint("/", playground.page, ["GET"])
        self.add_endpoint("/playground/{name}", playground.asset, ["GET"])

    @property
    def stream(self) -> bool:
        return True  # every response comes from the worker as a stream of events

    def decode_request(self, request: Any, context_kwargs: Any = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: Any = None) -> Any:
        return output

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_endpoints"] = []  # routes live in the API process; workers only pass jobs through
        return state

    def _tracked(self, route: str, handler: Handler) -> Handler:
        """Count every response of `handler` by route, adapter (set on request.state) and status."""

        async def run(request: Request, *args: Any, **kwargs: Any) -> Response:
            response = await handler(request, *args, **kwargs)
            adapter = getattr(request.state, "adapter", "-")
            self.metrics.requests.labels(route, adapter, str(response.status_code)).inc()
            if response.status_code >= 400:
                self.metrics.errors.labels(route, adapter).inc()
            return response

        run.__signature__ = inspect.signature(handler)  # type: ignore[attr-defined]  # FastAPI reads parameters
        return run


def _bind(fn: Handler, *args: Any) -> Handler:
    """The route handler `fn` with its leading arguments (what it shares) bound: an endpoint whose signature
    shows FastAPI the rest (the request, path parameters), with their types resolved."""
    bound = functools.partial(fn, *args)

    async def endpoint(*a: Any, **kw: Any) -> Response:
        return await bound(*a, **kw)

    endpoint.__signature__ = inspect.signature(bound, eval_str=True)  # type: ignore[attr-defined]
    return endpoint

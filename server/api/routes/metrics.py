"""GET /metrics: the Prometheus metrics of the API process (which sees every response)."""

from __future__ import annotations

from fastapi import Request, Response

from loraswap.server.api.auth import authorize
from loraswap.server.api.errors import APIError
from loraswap.server.api.metrics import Metrics
from loraswap.server.settings import Settings


async def metrics(settings: Settings, registry: Metrics, request: Request) -> Response:
    try:
        authorize(request, settings)  # metrics name adapters: they need the inference key when one is set
    except APIError as e:
        return e.response()
    return Response(registry.render(), media_type="text/plain; version=0.0.4")

"""GET /v1/models: the base and every adapter served for it, in OpenAI's model list."""

from __future__ import annotations

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from loraswap.server.api.auth import authorize
from loraswap.server.api.catalog import Catalog
from loraswap.server.api.errors import APIError


async def models(catalog: Catalog, request: Request) -> Response:
    try:
        authorize(request, catalog.settings)
    except APIError as e:
        return e.response()
    base = catalog.ref.base_id
    data = [{"id": base, "object": "model", "created": 0, "owned_by": "loraswap", "parent": None, **catalog.quant}]
    for name, entry in sorted(catalog.entries().items()):
        data.append({"id": name, "object": "model", "created": entry.created, "owned_by": "loraswap", "parent": base})
    return JSONResponse({"object": "list", "data": data})

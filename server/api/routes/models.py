"""GET /v1/models and /v1/models/{id}: the base (by its id and as "base"), "auto" (the router, when one is
installed) and every adapter served for the base, in OpenAI's model shape."""

from __future__ import annotations

from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from loraswap.server.api.auth import authorize
from loraswap.server.api.catalog import Catalog
from loraswap.server.api.errors import APIError


def _entries(catalog: Catalog) -> list[dict[str, Any]]:
    base = catalog.ref.base_id
    data = [{"id": base, "object": "model", "created": 0, "owned_by": "loraswap", "parent": None, **catalog.quant}]
    data.append({"id": "base", "object": "model", "created": 0, "owned_by": "loraswap", "parent": base})
    if catalog.has_router():  # "auto": the router picks an adapter by question type
        data.append({"id": "auto", "object": "model", "created": 0, "owned_by": "loraswap", "parent": base})
    for name, entry in sorted(catalog.entries().items()):
        data.append({"id": name, "object": "model", "created": entry.created, "owned_by": "loraswap", "parent": base})
    return data


async def models(catalog: Catalog, request: Request) -> Response:
    try:
        authorize(request, catalog.settings)
    except APIError as e:
        return e.response()
    return JSONResponse({"object": "list", "data": _entries(catalog)})


async def model(catalog: Catalog, request: Request, model_id: str) -> Response:
    """One entry of the list (the openai client's `models.retrieve`), or 404 with the names that exist."""
    try:
        authorize(request, catalog.settings)
        for entry in _entries(catalog):
            if entry["id"] == model_id:
                return JSONResponse(entry)
        catalog.lookup(model_id, "model")  # raises the 404 with close names (or why an adapter is unusable)
        raise APIError(404, f"model {model_id!r} not found", "not_found_error", param="model", code="model_not_found")
    except APIError as e:
        return e.response()

"""/v1/adapters: list the adapters served (inference key), upload and delete them (admin key or loopback).

Uploads and deletes change the store on disk with atomic renames, so every worker sees them at its next request;
a request already running on an adapter finishes on the weights it started with. With a registry, uploads are
published there (and cached here at once) and deletes unpublish, so every replica follows within its listing
interval; a registry that cannot be reached answers 503, a publish that lost a race 409.
"""

from __future__ import annotations

import asyncio

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from loraswap.adapters.manifest import AdapterError, AdapterNotFound, check_name
from loraswap.adapters.registry import RegistryError
from loraswap.adapters.replica import RegistryEntry
from loraswap.adapters.store import StoreEntry
from loraswap.server.api.auth import authorize
from loraswap.server.api.bridge import Bridge
from loraswap.server.api.catalog import Catalog
from loraswap.server.api.errors import APIError, from_form, from_install, from_name, from_registry, from_remove


async def list_adapters(catalog: Catalog, bridge: Bridge, request: Request) -> Response:
    try:
        authorize(request, catalog.settings)
    except APIError as e:
        return e.response()
    loaded = bridge.loaded()
    data = [{**entry.describe(), "loaded": name in loaded} for name, entry in catalog.entries().items()]
    return JSONResponse({"object": "list", "data": data})


async def upload(catalog: Catalog, request: Request) -> Response:
    """A multipart form: `name`, `file` (a .tar.gz or .zip of an adapter folder), `overwrite` ("true")."""
    from loraswap.adapters.archive import install_archive

    limit = catalog.settings.max_upload_bytes
    try:
        authorize(request, catalog.settings, admin=True)
        try:
            form = await request.form(max_part_size=limit)
        except HTTPException as e:  # starlette's multipart parser: malformed body, or a part over the limit
            raise from_form(e) from None
        name, file, overwrite = form.get("name"), form.get("file"), form.get("overwrite", "false")
        if not isinstance(name, str) or not name:
            raise APIError(400, "form field 'name' is required", param="name")
        try:
            check_name(name)
        except AdapterError as e:
            raise from_name(e) from None
        if file is None or isinstance(file, str):
            raise APIError(400, "form field 'file' must be a .tar.gz or .zip upload", param="file")
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise APIError(413, f"archive is over the {limit}-byte limit", param="file", code="payload_too_large")
        store = catalog.settings.store(with_registry=False)
        replace = str(overwrite).lower() == "true"
        max_rank = catalog.settings.max_rank
        replica = catalog.replica
        entry: StoreEntry | RegistryEntry
        try:
            if replica is not None:
                record = await asyncio.to_thread(replica.upload, data, name, replace, limit)
                entry = RegistryEntry(name, record)
            else:
                path = await asyncio.to_thread(
                    install_archive, data, name, store.user_dir, catalog.ref, replace, max_rank, limit
                )
                entry = StoreEntry(name, path, "user", store.get(name).manifest)
        except (AdapterError, OSError, RegistryError) as e:  # taken, invalid, the disk or the registry failed
            raise from_install(e, name) from None
        catalog.unusable.pop(name, None)
    except APIError as e:
        return e.response()
    return JSONResponse(entry.describe(), status_code=201)


async def delete(catalog: Catalog, request: Request, name: str) -> Response:
    try:
        authorize(request, catalog.settings, admin=True)
        try:
            check_name(name)
        except AdapterError as e:
            raise from_name(e) from None
        replica = catalog.replica
        try:
            try:
                if replica is None:
                    raise AdapterNotFound(name)
                await asyncio.to_thread(replica.remove, name)
            except AdapterNotFound:  # not in the registry: a local adapter, if any
                catalog.settings.store(with_registry=False).remove(name)
        except AdapterError as e:  # not found, or shipped (read-only)
            raise from_remove(e) from None
        except RegistryError as e:
            raise from_registry(e, "name") from None
        catalog.unusable.pop(name, None)
    except APIError as e:
        return e.response()
    return Response(status_code=204)

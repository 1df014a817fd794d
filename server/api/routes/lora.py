"""vLLM's runtime adapter endpoints, for the routers and sidecars that drive vLLM (the Gateway API Inference
Extension's adapter syncer, llm-d): `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` and
`POST /v1/unload_lora_adapter {"lora_name"}`, with vLLM's answers (200 and a line of text; 400 for a missing field
or a name already loaded; 404 for an adapter that cannot be found) in OpenAI's error shape. Admin routes: the admin
key, or the loopback address without one.

`lora_path` is
- a registry, `s3://BUCKET/PREFIX`, holding `lora_name`: this server's registry is pulled into its cache now (what
  a first request would do); another registry's adapter is copied into the local store;
- a folder on the server (a PEFT `save_pretrained` folder, with or without loraswap.json): validated exactly as an
  upload, and copied into the local store.

Unload removes this server's copy: a local adapter is deleted from the store, a registry adapter's cached copy is
dropped (the registry keeps it, and a later request pulls it again). A worker that has it loaded keeps the weights
until its own LRU evicts them; new requests for a deleted local adapter get a 404.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from fastapi import Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from loraswap.adapters.manifest import AdapterError, AdapterNotFound, check_name
from loraswap.adapters.registry import AdapterRefused, Registry, RegistryError, RegistryURI
from loraswap.server.api.auth import authorize
from loraswap.server.api.catalog import BASE_NAMES, Catalog
from loraswap.server.api.errors import APIError, from_install, from_name, from_registry, from_remove
from loraswap.server.api.protocol import read_body


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str = ""
    lora_path: str = ""


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str = ""
    lora_int_id: int | None = None


def _name(name: str) -> str:
    try:
        return check_name(name)
    except AdapterError as e:
        raise from_name(e) from None


async def load(catalog: Catalog, request: Request) -> Response:
    try:
        authorize(request, catalog.settings, admin=True)
        body = await read_body(request, LoadLoRAAdapterRequest, catalog.settings.max_body_bytes)
        if not body.lora_name or not body.lora_path:
            raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.", code="invalid_value")
        name = _name(body.lora_name)
        if name in BASE_NAMES or _held_here(catalog, name):
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        try:
            if body.lora_path.startswith("s3://"):
                await asyncio.to_thread(_from_registry, catalog, name, body.lora_path)
            else:
                await asyncio.to_thread(_from_folder, catalog, name, Path(body.lora_path))
        except AdapterNotFound as e:
            raise APIError(404, f"No adapter found: {e}", param="lora_path", code="model_not_found") from None
        except (AdapterRefused, RegistryError) as e:
            raise from_registry(e, "lora_path") from None
        except (AdapterError, OSError) as e:  # invalid (422), taken meanwhile (409), the disk failed
            raise from_install(e, name) from None
        except ValueError as e:  # not an s3:// URI of a bucket, or not an absolute path
            raise APIError(400, str(e), param="lora_path", code="invalid_value") from None
    except APIError as e:
        return e.response()
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


def _held_here(catalog: Catalog, name: str) -> bool:
    """Whether this server has a copy of `name` (in its store, or its registry cache)."""
    replica = catalog.replica
    if replica is not None and replica.cached(name):
        return True
    try:
        catalog.settings.store(with_registry=False).get(name)
        return True
    except AdapterNotFound:
        return False


def _from_registry(catalog: Catalog, name: str, uri: str) -> None:
    replica = catalog.replica
    if replica is not None and str(RegistryURI.parse(uri)) == str(replica.registry.uri):
        if not replica.ensure(name):
            replica.sync()  # the listing may be older than the publish the caller knows of
            if not replica.ensure(name):
                raise AdapterNotFound(f"adapter {name!r} is not in the registry {uri}")
        return
    from loraswap.adapters.registry import fetch

    s = catalog.settings
    registry = Registry(uri, s.registry_conditional_writes, s.registry_timeout)
    store = s.store(with_registry=False)
    staged = store.stage(name)
    try:
        fetch(registry, registry.record(name), staged, catalog.ref, s.max_rank)
        store.add(staged, name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    catalog.unusable.pop(name, None)


def _from_folder(catalog: Catalog, name: str, folder: Path) -> None:
    from loraswap.adapters.archive import prepare_folder

    if not folder.is_absolute():
        raise ValueError("lora_path must be an absolute folder on the server, or s3://BUCKET/PREFIX")
    if not folder.is_dir():
        raise AdapterNotFound(f"no adapter folder at {folder}")
    store = catalog.settings.store(with_registry=False)
    staged = store.stage(name)
    try:
        prepare_folder(folder, name, staged, catalog.ref, catalog.settings.max_rank)
        store.add(staged, name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    catalog.unusable.pop(name, None)


async def unload(catalog: Catalog, request: Request) -> Response:
    try:
        authorize(request, catalog.settings, admin=True)
        body = await read_body(request, UnloadLoRAAdapterRequest, catalog.settings.max_body_bytes)
        if not body.lora_name:
            raise APIError(400, "'lora_name' must be provided.", code="invalid_value")
        name = _name(body.lora_name)
        replica = catalog.replica
        if replica is not None and replica.drop(name):
            return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
        try:
            catalog.settings.store(with_registry=False).remove(name)
        except AdapterNotFound:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name") from None
        except AdapterError as e:  # shipped: read-only
            raise from_remove(e) from None
    except APIError as e:
        return e.response()
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

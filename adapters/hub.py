"""Adapters from the Hugging Face hub on first request: a request's `model: "hf:org/name"` (or `hf:org/name@revision`)
downloads the repository's `adapter_config.json` and `adapter_model.safetensors` through huggingface_hub (which honours
HF_ENDPOINT, HF_TOKEN and its own cache), validates them exactly as an upload is validated, and installs them into the
local store under a store name derived from the repository (`local_name`). Later requests find the local copy.

Off unless the server allows it (`LORASWAP_HUB_ADAPTERS=true`): a hub name lets any client make the server download
from the internet. Pickled weights (`adapter_model.bin`) are never fetched.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from loraswap.adapters.manifest import CONFIG_FILE, WEIGHTS_FILE, AdapterError, AdapterNotFound
from loraswap.adapters.registry import RegistryUnavailable

if TYPE_CHECKING:
    from loraswap.adapters.base import BaseRef
    from loraswap.adapters.store import AdapterStore

PREFIX = "hf:"
_REPO = re.compile(r"^([A-Za-z0-9][\w.-]{0,95})/([A-Za-z0-9][\w.-]{0,95})(?:@([\w./-]{1,128}))?$")


class HubUnavailable(RegistryUnavailable):
    """The hub could not be reached (or is switched off by HF_HUB_OFFLINE)."""


def is_hub_name(model: str) -> bool:
    return model.startswith(PREFIX)


def parse(model: str) -> tuple[str, str | None]:
    """`hf:org/name[@revision]` -> (repo id, revision); AdapterError for anything else."""
    m = _REPO.match(model.removeprefix(PREFIX))
    if not is_hub_name(model) or not m or ".." in model:
        raise AdapterError(f"{model!r} is not a hub adapter name: use hf:ORG/NAME or hf:ORG/NAME@REVISION")
    return f"{m.group(1)}/{m.group(2)}", m.group(3)


def local_name(model: str) -> str:
    """The store name of hub adapter `model`: `hf--org--name` (lower case, a digest of the exact spelling added where
    case or a revision would otherwise collide or the name is too long)."""
    repo, revision = parse(model)
    slug = "hf--" + re.sub(r"[^a-z0-9._-]+", "-", repo.lower().replace("/", "--"))
    exact = repo + ("@" + revision if revision else "")
    if exact.lower() != exact or revision or len(slug) > 64:
        slug = f"{slug[:55]}-{hashlib.sha256(exact.encode()).hexdigest()[:8]}"
    return slug


def install(model: str, store: AdapterStore, ref: BaseRef, max_rank: int, endpoint: str | None = None) -> str:
    """Download hub adapter `model`, validate it for `ref` and add it to `store`; its store name. AdapterNotFound
    for a repository, revision or file the hub does not have; HubUnavailable when the hub cannot be reached."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from loraswap.adapters.archive import prepare_folder

    repo, revision = parse(model)
    name = local_name(model)
    with tempfile.TemporaryDirectory(prefix="loraswap-hub-") as tmp:
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            try:
                hf_hub_download(repo, f, revision=revision, local_dir=tmp, endpoint=endpoint)
            except LocalEntryNotFoundError:  # no connection, and nothing cached
                raise HubUnavailable(f"the hub could not be reached for {model!r}") from None
            except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
                what = type(e).__name__.removesuffix("Error").replace("NotFound", " not found").lower()
                raise AdapterNotFound(f"hub adapter {model!r}: {what} ({repo}, {f})") from None
            except (OfflineModeIsEnabled, HfHubHTTPError, OSError) as e:
                raise HubUnavailable(f"the hub could not be read for {model!r}: {type(e).__name__}") from None
        staged = store.stage(name)
        try:
            prepare_folder(Path(tmp), name, staged, ref, max_rank)
            store.add(staged, name)
        except FileExistsError:
            pass  # another request installed it first: the same repository, validated the same way
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    return name

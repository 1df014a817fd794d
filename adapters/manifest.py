"""What an adapter is on disk: a folder with PEFT's two files plus loraswap's manifest.

    <store>/<name>/adapter_config.json        PEFT config (method, rank, alpha, target modules, ...)
    <store>/<name>/adapter_model.safetensors  the weights (never pickles)
    <store>/<name>/loraswap.json              this manifest: base, prompt format, training, metrics
    <store>/<name>/loss.json, loss.png        training log (optional)

A folder appears under its final name only when complete: it is written under a temporary name
in the same directory and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraswap.adapters.prompt import PROMPT_FORMAT_VERSION

if TYPE_CHECKING:
    from loraswap.adapters.base import BaseRef

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "loraswap.json"
MANIFEST_SCHEMA_VERSION = 1

Method = Literal["lora", "prefix", "prompt", "ptuning"]
# PEFT's names for the methods loraswap trains and serves.
PEFT_TYPES: dict[str, Method] = {
    "LORA": "lora",
    "PREFIX_TUNING": "prefix",
    "PROMPT_TUNING": "prompt",
    "P_TUNING": "ptuning",
}

NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
BASE = "__base__"
"""The base model's name where rows name their adapter (PEFT's `adapter_names` spelling); no adapter can be called
this, since names start with a letter or digit."""
_NAME = re.compile(rf"^{NAME_PATTERN}$")


class AdapterError(ValueError):
    """An adapter is malformed, incompatible or missing; the message says what and why."""


class AdapterNotFound(AdapterError, LookupError):
    pass


class BaseMismatch(AdapterError):
    pass


def check_name(name: str) -> str:
    """Adapter names are path components: `[a-z0-9][a-z0-9._-]{0,63}` and no `..`."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise AdapterError(
            f"invalid adapter name {name!r}: use 1-64 characters of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def qtype_to_name(qtype: str) -> str:
    """'genetic changes' -> 'genetic-changes'."""
    return check_name(re.sub(r"[^a-z0-9]+", "-", qtype.lower()).strip("-"))


class AdapterManifest(BaseModel):
    """loraswap.json: how an adapter was made and what it is for."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = MANIFEST_SCHEMA_VERSION
    name: str
    qtype: str | None = None
    method: Method
    base_id: str
    base_fingerprint: str
    prompt_format_version: int
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] = Field(default_factory=list)
    num_virtual_tokens: int | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    data_source: str | None = None
    split_hash: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    weights_sha256: str
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: Path) -> AdapterManifest:
    try:
        return AdapterManifest.model_validate_json((folder / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise AdapterError(f"adapter {folder.name!r} has no {MANIFEST_FILE}") from None
    except ValueError as e:
        raise AdapterError(f"adapter {folder.name!r}: {MANIFEST_FILE} is invalid: {e}") from None


def read_peft_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise AdapterError(f"adapter {folder.name!r} has no {CONFIG_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"adapter {folder.name!r}: {CONFIG_FILE} does not parse: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {folder.name!r}: {CONFIG_FILE} is not a JSON object")
    return config


def method_of(peft_config: dict[str, Any]) -> Method:
    peft_type = str(peft_config.get("peft_type", ""))
    if peft_type not in PEFT_TYPES:
        raise AdapterError(f"unsupported adapter method {peft_type!r}; supported: {', '.join(PEFT_TYPES)}")
    return PEFT_TYPES[peft_type]


def build_manifest(
    folder: Path,
    name: str,
    ref: BaseRef,
    weights_sha256: str,
    *,
    qtype: str | None = None,
    training: dict[str, Any] | None = None,
    data_source: str | None = None,
    split_hash: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> AdapterManifest:
    """The manifest of the adapter whose PEFT files are in `folder`, for base `ref`: its method, rank, alpha,
    target modules and virtual tokens are read from its adapter_config.json (so the manifest says what the files
    hold, whoever wrote them); how it was made (qtype, training, data, split, metrics) is the caller's to say."""
    config = read_peft_config(folder)
    method = method_of(config)
    targets = config.get("target_modules") or []
    return AdapterManifest(
        name=name,
        qtype=qtype,
        method=method,
        base_id=ref.base_id,
        base_fingerprint=ref.fingerprint,
        prompt_format_version=PROMPT_FORMAT_VERSION,
        rank=config.get("r") if method == "lora" else None,
        alpha=config.get("lora_alpha") if method == "lora" else None,
        target_modules=sorted(targets) if isinstance(targets, list) else [str(targets)],
        num_virtual_tokens=config.get("num_virtual_tokens") if method != "lora" else None,
        training=training or {},
        data_source=data_source,
        split_hash=split_hash,
        metrics=metrics or {},
        weights_sha256=weights_sha256,
    )


def write_manifest(folder: Path, manifest: AdapterManifest) -> None:
    tmp = folder / f".{MANIFEST_FILE}.tmp"
    with tmp.open("w") as f:
        f.write(manifest.model_dump_json(indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST_FILE)


def fsync_dir(folder: Path) -> None:
    """Make the entries of `folder` (created, renamed) durable, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename itself is still atomic
    finally:
        os.close(fd)


def staging_dir(parent: Path, name: str) -> Path:
    """A fresh hidden folder beside the final one (same file system, so the final rename is atomic)."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def publish(staged: Path, final: Path, overwrite: bool) -> None:
    """Move a complete staged folder to its final name; the staged folder is gone afterwards either way.

    Without `overwrite` an existing adapter is an error, also when another process publishes the same
    name at the same moment (renaming onto a non-empty folder fails): exactly one of them wins. With
    `overwrite` the two folders are swapped in one atomic step (Linux), so readers always see the old or
    the new complete adapter. Elsewhere the old folder is renamed aside first, and between the two
    renames readers see none; a crash there is undone by `recover`. Overwrites racing each other end with
    the last one's adapter.
    """
    olds: list[Path] = []
    try:
        fsync_dir(staged)  # the staged files are on disk before the folder gets its final name
        if overwrite and _exchange(staged, final):  # one atomic swap: readers never miss the name
            olds.append(staged)  # now holds the old adapter
            fsync_dir(final.parent)
            return
        for _ in range(16):
            if final.exists():
                if not overwrite:
                    raise FileExistsError(f"adapter {final.name!r} already exists")
                old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(final, old)
                    olds.append(old)
                except FileNotFoundError:  # another overwrite moved it first
                    pass
            try:
                os.rename(staged, final)
                break
            except OSError as e:
                if not final.exists():
                    raise
                if not overwrite:  # another publisher won the race
                    raise FileExistsError(f"adapter {final.name!r} already exists") from e
        else:
            raise FileExistsError(f"adapter {final.name!r} kept changing while it was replaced; try again")
        fsync_dir(final.parent)  # the rename is durable once publish returns
    finally:
        shutil.rmtree(staged, ignore_errors=True)
        for old in olds:
            shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available,
    or `b` does not exist."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def recover(parent: Path) -> list[str]:
    """Finish what a crash (kill -9, power loss) left half done in a store folder; what was done, one line each.

    Only hidden folders are touched; none of them is ever served. An upload that never reached its final
    rename left `.tmp-*` (removed), a delete left `.trash-*` (removed), and an overwrite stopped between
    its two renames left `.old-NAME-*` without NAME: the old adapter is renamed back, so the name keeps
    a complete adapter. Run it before serving, with no other process writing to the folder.
    """
    done: list[str] = []
    if not parent.is_dir():
        return done
    for p in sorted(parent.iterdir()):
        if not p.is_dir() or p.is_symlink():
            continue
        kind, _, rest = p.name.partition("-")
        if kind in (".tmp", ".trash"):
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed the unfinished {'upload' if kind == '.tmp' else 'delete'} {p.name}")
        elif kind == ".old" and len(rest) > 9 and rest[-9] == "-":
            name = rest[:-9]
            if (parent / name).exists():
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed {p.name}, replaced by the new {name!r}")
            else:
                os.rename(p, parent / name)
                done.append(f"restored {name!r} from an interrupted overwrite")
    if done:
        fsync_dir(parent)
    return done


def dump_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")

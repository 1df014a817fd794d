"""Adapter archives (.tar.gz / .zip): safe extraction and all-or-nothing installation into a store.

An archive holds one adapter: `adapter_config.json` and `adapter_model.safetensors`, optionally
`loraswap.json` and the loss log, either at the archive root or inside one top-level folder.
Everything else is refused before a byte is written: paths outside the root, absolute paths,
links, devices, unknown files, pickles, too many members, and more content than the size limit
(checked while extracting, so a decompression bomb stops at the limit, whatever its headers claim).
"""

from __future__ import annotations

import io
import shutil
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from loraswap.adapters.base import BaseRef
from loraswap.adapters.manifest import (
    CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    AdapterError,
    AdapterManifest,
    check_name,
    method_of,
    publish,
    read_manifest,
    read_peft_config,
    sha256_of,
    staging_dir,
    write_manifest,
)
from loraswap.adapters.prompt import PROMPT_FORMAT_VERSION
from loraswap.adapters.validate import DEFAULT_MAX_RANK, PICKLE_SUFFIXES, validate_adapter

ALLOWED_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE, "loss.json", "loss.png", "README.md"})
DEFAULT_MAX_BYTES = 256 << 20
MAX_MEMBERS = 32


def _safe_name(raw: str) -> str:
    """The file name a member may be written as, or an AdapterError saying why it may not."""
    if raw.startswith(("/", "\\")) or (len(raw) > 1 and raw[1] == ":"):
        raise AdapterError(f"archive member {raw!r} has an absolute path")
    parts = [p for p in PurePosixPath(raw.replace("\\", "/")).parts if p not in ("", ".")]
    if ".." in parts:
        raise AdapterError(f"archive member {raw!r} points outside the archive")
    if not parts:
        raise AdapterError(f"archive member {raw!r} has an empty name")
    if len(parts) > 2:
        raise AdapterError(f"archive member {raw!r} is nested too deep; put the files at the root or in one folder")
    return "/".join(parts)


def _tar_members(data: bytes) -> Iterator[tuple[str, IO[bytes] | None]]:
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")  # noqa: SIM115 (members are read lazily)
        members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise AdapterError(f"not a readable tar archive: {e}") from None
    for m in members:
        if m.issym() or m.islnk():
            raise AdapterError(f"archive member {m.name!r} is a link; links are refused")
        if m.isdir():
            _safe_name(m.name)
            continue
        if not m.isfile():
            raise AdapterError(f"archive member {m.name!r} is not a regular file (device, fifo or special)")
        yield m.name, tar.extractfile(m)


def _zip_members(data: bytes) -> Iterator[tuple[str, IO[bytes] | None]]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise AdapterError(f"not a readable zip archive: {e}") from None
    for info in infos:
        mode = info.external_attr >> 16
        if mode and (mode & 0o170000) not in (0, 0o100000, 0o040000):
            raise AdapterError(f"archive member {info.filename!r} is a link or special file; refused")
        if info.is_dir():
            _safe_name(info.filename)
            continue
        yield info.filename, zf.open(info)


def extract_adapter(data: bytes, dest: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Extract an adapter archive into the empty folder `dest`, flattening one top-level folder."""
    if len(data) > max_bytes:
        raise AdapterError(f"archive is {len(data)} bytes; the limit is {max_bytes}")
    if data[:2] == b"PK":
        members = _zip_members(data)
    elif data[:2] == b"\x1f\x8b" or data[257:262] == b"ustar":
        members = _tar_members(data)
    else:
        raise AdapterError("not a .tar.gz or .zip archive")
    written: dict[str, str] = {}
    total = 0
    for count, (raw, stream) in enumerate(members, start=1):
        if count > MAX_MEMBERS:
            raise AdapterError(f"archive has more than {MAX_MEMBERS} members")
        name = _safe_name(raw)
        base = name.rsplit("/", 1)[-1]
        if base.endswith(PICKLE_SUFFIXES):
            raise AdapterError(
                f"archive member {raw!r}: pickled weights are refused (they can run code); use safetensors"
            )
        if base not in ALLOWED_FILES:
            raise AdapterError(
                f"archive member {raw!r} is not an adapter file; allowed: {', '.join(sorted(ALLOWED_FILES))}"
            )
        if base in written:
            raise AdapterError(f"archive holds {base!r} twice ({written[base]!r} and {raw!r})")
        written[base] = name
        if stream is None:
            raise AdapterError(f"archive member {raw!r} cannot be read")
        with stream, (dest / base).open("wb") as out:
            # Count what is actually decompressed: headers can lie about sizes.
            while chunk := stream.read(1 << 20):
                total += len(chunk)
                if total > max_bytes:
                    raise AdapterError(f"archive expands to more than {max_bytes} bytes; refused")
                out.write(chunk)
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in written:
            raise AdapterError(f"archive has no {required}")
    folders = {n.split("/")[0] for n in written.values() if "/" in n}
    at_root = any("/" not in n for n in written.values())
    if len(folders) > 1 or (folders and at_root):
        raise AdapterError("archive files must sit at the root or together in one folder")


def manifest_for_upload(folder: Path, name: str, ref: BaseRef) -> AdapterManifest:
    """The manifest an uploaded adapter is stored with: its own if it has one (checked later against
    the base), otherwise one describing it from its PEFT config, for the base it is uploaded to."""
    config = read_peft_config(folder)
    weights_sha = sha256_of(folder / WEIGHTS_FILE)
    if (folder / MANIFEST_FILE).is_file():
        return read_manifest(folder).model_copy(update={"name": name})
    method = method_of(config)
    targets = config.get("target_modules") or []
    return AdapterManifest(
        name=name,
        method=method,
        base_id=ref.base_id,
        base_fingerprint=ref.fingerprint,
        prompt_format_version=PROMPT_FORMAT_VERSION,
        rank=config.get("r") if method == "lora" else None,
        alpha=config.get("lora_alpha") if method == "lora" else None,
        target_modules=sorted(targets) if isinstance(targets, list) else [str(targets)],
        num_virtual_tokens=config.get("num_virtual_tokens") if method != "lora" else None,
        data_source="upload",
        weights_sha256=weights_sha,
    )


def install_archive(
    data: bytes,
    name: str,
    store_dir: Path,
    ref: BaseRef,
    overwrite: bool = False,
    max_rank: int = DEFAULT_MAX_RANK,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Path:
    """Extract, validate against `ref`, and publish `store_dir/<name>`; on any error nothing is left behind."""
    check_name(name)
    final = store_dir / name
    if final.exists() and not overwrite:
        raise FileExistsError(f"adapter {name!r} already exists")
    staged = staging_dir(store_dir, name)
    try:
        extract_adapter(data, staged, max_bytes=max_bytes)
        # A manifest is needed for validation; an upload without one is described for this base.
        manifest = manifest_for_upload(staged, name, ref)
        write_manifest(staged, manifest)
        problems = validate_adapter(staged, ref, max_rank=max_rank)
        if problems:
            raise AdapterError("; ".join(problems))
        publish(staged, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return final

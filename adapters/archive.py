"""Adapter archives (.tar.gz / .zip): safe extraction and all-or-nothing installation into a store.

An archive holds one adapter: `adapter_config.json` and `adapter_model.safetensors`, optionally
`loraswap.json` and the loss log, either at the archive root or inside one top-level folder.
Everything else is refused, and the staging folder removed: paths outside the root, absolute paths,
links, devices, unknown files, pickles, too many members, unreadable or encrypted members, and more
content than the size limit (declared sizes are checked first, and what is actually decompressed is
counted while extracting, so a decompression bomb stops at the limit whatever its headers claim).
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import zipfile
import zlib
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
    build_manifest,
    check_name,
    read_manifest,
    sha256_of,
    write_manifest,
)
from loraswap.adapters.store import AdapterStore
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


def _tar_members(data: bytes, max_bytes: int) -> Iterator[tuple[str, IO[bytes] | None]]:
    """Members in archive order, read lazily: a member is refused on its header (link, device, declared
    size over the limit) before the archive is decompressed any further."""
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")  # noqa: SIM115 (members are read lazily)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise AdapterError(f"not a readable tar archive: {e}") from None
    declared = 0
    members = iter(tar)
    while True:
        try:
            m = next(members, None)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise AdapterError(f"not a readable tar archive: {e}") from None
        if m is None:
            return
        if m.issym() or m.islnk():
            raise AdapterError(f"archive member {m.name!r} is a link; links are refused")
        if m.isdir():
            _safe_name(m.name)
            yield m.name, None
            continue
        if not m.isfile():
            raise AdapterError(f"archive member {m.name!r} is not a regular file (device, fifo or special)")
        declared += m.size
        if declared > max_bytes:
            raise AdapterError(f"archive expands to more than {max_bytes} bytes; refused")
        yield m.name, tar.extractfile(m)


def _zip_members(data: bytes, max_bytes: int) -> Iterator[tuple[str, IO[bytes] | None]]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise AdapterError(f"not a readable zip archive: {e}") from None
    if sum(info.file_size for info in infos) > max_bytes:
        raise AdapterError(f"archive expands to more than {max_bytes} bytes; refused")
    for info in infos:
        mode = info.external_attr >> 16
        if mode and (mode & 0o170000) not in (0, 0o100000, 0o040000):
            raise AdapterError(f"archive member {info.filename!r} is a link or special file; refused")
        if info.is_dir():
            _safe_name(info.filename)
            yield info.filename, None
            continue
        try:
            yield info.filename, zf.open(info)
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, ValueError, OSError) as e:
            # RuntimeError: encrypted; NotImplementedError: an unsupported compression method
            raise AdapterError(f"archive member {info.filename!r} cannot be read: {e}") from None


def _copy(stream: IO[bytes], out: IO[bytes], raw: str, total: int, max_bytes: int) -> int:
    """Copy one member, counting what is actually decompressed (headers can lie about sizes); the new total."""
    while True:
        try:
            chunk = stream.read(1 << 20)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, RuntimeError, ValueError) as e:
            raise AdapterError(f"archive member {raw!r} is corrupt: {e}") from None
        if not chunk:
            return total
        total += len(chunk)
        if total > max_bytes:
            raise AdapterError(f"archive expands to more than {max_bytes} bytes; refused")
        out.write(chunk)


def extract_adapter(data: bytes, dest: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Extract an adapter archive into the empty folder `dest`, flattening one top-level folder. Every
    file written is flushed to disk (fsync) before this returns."""
    if len(data) > max_bytes:
        raise AdapterError(f"archive is {len(data)} bytes; the limit is {max_bytes}")
    if data[:2] == b"PK":
        members = _zip_members(data, max_bytes)
    elif data[:2] == b"\x1f\x8b" or data[257:262] == b"ustar":
        members = _tar_members(data, max_bytes)
    else:
        raise AdapterError("not a .tar.gz or .zip archive")
    written: dict[str, str] = {}
    total = 0
    for count, (raw, stream) in enumerate(members, start=1):
        if count > MAX_MEMBERS:
            raise AdapterError(f"archive has more than {MAX_MEMBERS} members")
        name = _safe_name(raw)
        if stream is None:  # a folder: checked, nothing to write
            continue
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
        with stream, (dest / base).open("wb") as out:
            total = _copy(stream, out, raw, total, max_bytes)
            out.flush()
            os.fsync(out.fileno())
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in written:
            raise AdapterError(f"archive has no {required}")
    folders = {n.split("/")[0] for n in written.values() if "/" in n}
    at_root = any("/" not in n for n in written.values())
    if len(folders) > 1 or (folders and at_root):
        raise AdapterError("archive files must sit at the root or together in one folder")


def manifest_for_upload(folder: Path, name: str, ref: BaseRef, weights_sha256: str) -> AdapterManifest:
    """The manifest an uploaded adapter is stored with: its own if it has one (checked later against
    the base and against `weights_sha256`, the weights' digest), otherwise one describing it from its PEFT
    config, for the base it is uploaded to."""
    if (folder / MANIFEST_FILE).is_file():
        return read_manifest(folder).model_copy(update={"name": name})
    return build_manifest(folder, name, ref, weights_sha256, data_source="upload")


def prepare_archive(
    data: bytes,
    name: str,
    staged: Path,
    ref: BaseRef,
    max_rank: int = DEFAULT_MAX_RANK,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> None:
    """Extract the archive `data` into the empty folder `staged`, give it its manifest for `name`, and validate it
    against `ref`: an AdapterError (naming `name`, not the folder) when anything is wrong. The caller publishes
    the folder (into a store, or to the registry) or removes it."""
    try:
        extract_adapter(data, staged, max_bytes=max_bytes)
    except AdapterError as e:
        raise AdapterError(str(e).replace(repr(staged.name), repr(name))) from None
    _describe_and_validate(staged, name, ref, max_rank)


def prepare_folder(src: Path, name: str, staged: Path, ref: BaseRef, max_rank: int = DEFAULT_MAX_RANK) -> None:
    """`prepare_archive` for an adapter folder (a PEFT `save_pretrained` folder, with or without loraswap.json):
    its adapter files are copied into `staged`, anything else is left out."""
    if not src.is_dir():
        raise AdapterError(f"{src.name!r} is not a folder")
    for f in sorted(src.iterdir()):
        if f.name.endswith(PICKLE_SUFFIXES):
            raise AdapterError(f"{f.name}: pickled weights are refused (they can run code); use safetensors")
        if f.name in ALLOWED_FILES and f.is_file() and not f.is_symlink():
            shutil.copyfile(f, staged / f.name)
    _describe_and_validate(staged, name, ref, max_rank)


def _describe_and_validate(staged: Path, name: str, ref: BaseRef, max_rank: int) -> None:
    try:
        for required in (CONFIG_FILE, WEIGHTS_FILE):
            if not (staged / required).is_file():
                raise AdapterError(f"adapter {name!r} has no {required}")
        weights_sha256 = sha256_of(staged / WEIGHTS_FILE)  # once: the manifest records it, validation compares
        # A manifest is needed for validation; an upload without one is described for this base.
        write_manifest(staged, manifest_for_upload(staged, name, ref, weights_sha256))
        problems = validate_adapter(staged, ref, max_rank=max_rank, weights_sha256=weights_sha256)
        if problems:
            raise AdapterError("; ".join(problems))
    except AdapterError as e:
        # Messages name the folder they read: the hidden staging name means nothing to the uploader.
        raise AdapterError(str(e).replace(repr(staged.name), repr(name))) from None


def install_archive(
    data: bytes,
    name: str,
    store_dir: Path,
    ref: BaseRef,
    overwrite: bool = False,
    max_rank: int = DEFAULT_MAX_RANK,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Path:
    """Extract, validate against `ref`, and publish `store_dir/<name>` (`AdapterStore.add`); on any error nothing
    is left behind."""
    check_name(name)
    store = AdapterStore(store_dir, shipped_dir=None)
    if (store_dir / name).exists() and not overwrite:
        raise FileExistsError(f"adapter {name!r} already exists")
    staged = store.stage(name)
    try:
        prepare_archive(data, name, staged, ref, max_rank, max_bytes)
        return store.add(staged, name, overwrite=overwrite).path
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise

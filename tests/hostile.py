"""Hostile and broken adapter uploads, as a table: each case builds an archive from a good adapter's files
and names the words its refusal must contain. Used at the archive layer (test_archive.py, every case) and
through the HTTP upload route (test_reliability.py, a representative subset)."""

from __future__ import annotations

import io
import json
import math
import struct
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

from loraswap.adapters.manifest import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE

Files = dict[str, bytes]


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Files], bytes]
    """Good adapter files (config, weights, manifest) -> the archive to upload."""
    message: str
    """Words the refusal's message contains."""
    max_bytes: int | None = None
    """Size limit to install under (None: the default)."""


def tar_gz(files: Files, extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return buf.getvalue()


def zip_bytes(files: Files, infos: list[tuple[zipfile.ZipInfo, bytes]] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for info, data in infos or []:
            zf.writestr(info, data)
    return buf.getvalue()


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def _zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (0o120777 << 16) | 0x20  # S_IFLNK: how zip tools store a symbolic link
    return info, target.encode()


def _encrypted(archive: bytes) -> bytes:
    """Set the 'encrypted' flag on every member, in local headers and the central directory."""
    data = bytearray(archive)
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(sig)
        while at != -1:
            data[at + flag_at] |= 1
            at = data.find(sig, at + 4)
    return bytes(data)


def _config(files: Files, **changes: object) -> Files:
    """Without the manifest (it would no longer describe the config); the upload path writes one."""
    config = json.loads(files[CONFIG_FILE]) | changes
    return {CONFIG_FILE: json.dumps(config).encode(), WEIGHTS_FILE: files[WEIGHTS_FILE]}


def _header(weights: bytes) -> tuple[dict, bytes]:  # type: ignore[type-arg]
    (n,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8 : 8 + n]), weights[8 + n :]


def _with_header(files: Files, edit: Callable[[dict], object]) -> Files:  # type: ignore[type-arg]
    """The weights with an edited header (data bytes unchanged), without the manifest."""
    header, data = _header(files[WEIGHTS_FILE])
    new = edit(header)
    raw = json.dumps(header if new is None else new).encode()
    return {CONFIG_FILE: files[CONFIG_FILE], WEIGHTS_FILE: struct.pack("<Q", len(raw)) + raw + data}


def _first_tensor(header: dict) -> dict:  # type: ignore[type-arg]
    return header[min(k for k in header if k != "__metadata__")]


def _lie_shape(header: dict) -> None:  # type: ignore[type-arg]
    _first_tensor(header)["shape"][0] *= 2


def _lie_offsets(header: dict) -> None:  # type: ignore[type-arg]
    t = _first_tensor(header)
    t["data_offsets"] = [t["data_offsets"][0] + 10**9, t["data_offsets"][1] + 10**9]


def _overlap(header: dict) -> None:  # type: ignore[type-arg]
    tensors = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    (_, first), (second_offsets, second) = tensors[0], tensors[1]
    size = second_offsets[1] - second_offsets[0]
    header[second]["data_offsets"] = [header[first]["data_offsets"][0], header[first]["data_offsets"][0] + size]


def _int_dtype(header: dict) -> None:  # type: ignore[type-arg]
    _first_tensor(header)["dtype"] = "I32"


def _tensors(files: Files, edit: Callable[[dict], None]) -> Files:  # type: ignore[type-arg]
    """Real safetensors weights with edited tensors, without the manifest."""
    from safetensors.torch import load, save

    tensors = load(files[WEIGHTS_FILE])
    edit(tensors)
    return {CONFIG_FILE: files[CONFIG_FILE], WEIGHTS_FILE: save(tensors)}


def _narrow(tensors: dict) -> None:  # type: ignore[type-arg]
    """Every lora_A one input column short: the wrong shape for the base."""
    for k in list(tensors):
        if "lora_A" in k:
            tensors[k] = tensors[k][:, :-1].contiguous()


def _elsewhere(tensors: dict) -> None:  # type: ignore[type-arg]
    for k in list(tensors):
        tensors[k.replace("q_proj", "no_such_proj")] = tensors.pop(k)


def _poison(value: float) -> Callable[[dict], None]:  # type: ignore[type-arg]
    def edit(tensors: dict) -> None:  # type: ignore[type-arg]
        t = tensors[min(tensors)]
        t.view(-1)[3] = value

    return edit


def _manifest(files: Files, **changes: object) -> Files:
    return files | {MANIFEST_FILE: json.dumps(json.loads(files[MANIFEST_FILE]) | changes).encode()}


def _many_members(files: Files) -> bytes:
    return tar_gz({**files}, [_special(f"d{i}/", tarfile.DIRTYPE) for i in range(40)])


def _bomb(files: Files) -> bytes:
    return tar_gz({**files, "README.md": b"\0" * (8 << 20)})


def _zip_bomb(files: Files) -> bytes:
    return zip_bytes({**files, "README.md": b"\0" * (8 << 20)})


HOSTILE: list[Case] = [
    # where files would be written
    Case("tar-traversal", lambda f: tar_gz({**f, "../evil.json": b"{}"}), "points outside the archive"),
    Case("tar-deep-traversal", lambda f: tar_gz({**f, "a/../../evil.json": b"{}"}), "points outside the archive"),
    Case("tar-absolute", lambda f: tar_gz({**f, "/etc/cron.d/x": b"x"}), "absolute path"),
    Case("zip-traversal", lambda f: zip_bytes({**f, "../../x/README.md": b"x"}), "points outside the archive"),
    Case("zip-absolute", lambda f: zip_bytes({**f, "/tmp/x/README.md": b"x"}), "absolute path"),
    Case("zip-drive-letter", lambda f: zip_bytes({**f, "C:\\x\\README.md": b"x"}), "absolute path"),
    Case("nested-too-deep", lambda f: tar_gz({f"a/b/{k}": v for k, v in f.items()}), "nested too deep"),
    Case(
        "two-folders",
        lambda f: tar_gz({"a/" + CONFIG_FILE: f[CONFIG_FILE], "b/" + WEIGHTS_FILE: f[WEIGHTS_FILE]}),
        "one folder",
    ),
    # what kind of file
    Case(
        "tar-symlink",
        lambda f: tar_gz({CONFIG_FILE: f[CONFIG_FILE]}, [_special(WEIGHTS_FILE, tarfile.SYMTYPE, "/etc/passwd")]),
        "is a link",
    ),
    Case(
        "tar-hard-link",
        lambda f: tar_gz({CONFIG_FILE: f[CONFIG_FILE]}, [_special(WEIGHTS_FILE, tarfile.LNKTYPE, CONFIG_FILE)]),
        "is a link",
    ),
    Case(
        "zip-symlink",
        lambda f: zip_bytes({CONFIG_FILE: f[CONFIG_FILE]}, [_zip_symlink(WEIGHTS_FILE, "/etc/passwd")]),
        "link or special",
    ),
    Case(
        "char-device",
        lambda f: tar_gz({CONFIG_FILE: f[CONFIG_FILE]}, [_special(WEIGHTS_FILE, tarfile.CHRTYPE)]),
        "not a regular file",
    ),
    Case(
        "block-device",
        lambda f: tar_gz({CONFIG_FILE: f[CONFIG_FILE]}, [_special(WEIGHTS_FILE, tarfile.BLKTYPE)]),
        "not a regular file",
    ),
    Case(
        "fifo",
        lambda f: tar_gz({CONFIG_FILE: f[CONFIG_FILE]}, [_special(WEIGHTS_FILE, tarfile.FIFOTYPE)]),
        "not a regular file",
    ),
    Case("pickle-bin", lambda f: tar_gz({**f, "adapter_model.bin": b"\x80\x04"}), "pickled weights are refused"),
    Case("pickle-pt", lambda f: zip_bytes({**f, "weights.pt": b"\x80\x04"}), "pickled weights are refused"),
    Case("unknown-file", lambda f: tar_gz({**f, "run.py": b"import os"}), "is not an adapter file"),
    Case("duplicate-member", lambda f: tar_gz(f, [tarfile.TarInfo(CONFIG_FILE)]), "twice"),
    Case("too-many-members", _many_members, "more than 32 members"),
    Case("no-weights", lambda f: tar_gz({CONFIG_FILE: f[CONFIG_FILE]}), f"no {WEIGHTS_FILE}"),
    Case("no-config", lambda f: tar_gz({WEIGHTS_FILE: f[WEIGHTS_FILE]}), f"no {CONFIG_FILE}"),
    # broken containers
    Case("garbage", lambda f: b"this is not an archive at all", "not a .tar.gz or .zip"),
    Case("truncated-tar", lambda f: tar_gz(f)[:200], "not a readable tar archive|is corrupt"),
    Case("truncated-zip", lambda f: zip_bytes(f)[:300], "not a readable zip archive"),
    Case("encrypted-zip", lambda f: _encrypted(zip_bytes(f)), "cannot be read"),
    # size
    Case("tar-bomb", _bomb, "expands to more than", max_bytes=1 << 20),
    Case("zip-bomb", _zip_bomb, "expands to more than", max_bytes=1 << 20),
    Case("over-size-limit", lambda f: tar_gz(f), "the limit is 1000", max_bytes=1000),
    # configuration
    Case("config-not-json", lambda f: tar_gz({**f, CONFIG_FILE: b"{oops"}), "does not parse"),
    Case("config-not-object", lambda f: tar_gz({**f, CONFIG_FILE: b"[1, 2]"}), "not a JSON object"),
    Case("unknown-method", lambda f: tar_gz(_config(f, peft_type="IA3")), "unsupported adapter method"),
    Case("absurd-rank", lambda f: tar_gz(_config(f, r=100000)), "outside 1..64"),
    Case("zero-rank", lambda f: tar_gz(_config(f, r=0)), "outside 1..64"),
    Case("rank-not-int", lambda f: tar_gz(_config(f, r="8")), "outside 1..64"),
    Case("absurd-alpha", lambda f: tar_gz(_config(f, lora_alpha=1e30)), "lora_alpha"),
    # weights file
    Case(
        "header-length-lies",
        lambda f: tar_gz({**f, WEIGHTS_FILE: (10**12).to_bytes(8, "little") + f[WEIGHTS_FILE][8:]}),
        "header length",
    ),
    Case(
        "header-not-json",
        lambda f: tar_gz({**f, WEIGHTS_FILE: struct.pack("<Q", 4) + b"{{{{" + b"\0" * 64}),
        "header is not JSON",
    ),
    Case("header-not-object", lambda f: tar_gz(_with_header(f, lambda h: [1, 2])), "not a JSON object"),
    Case("header-shape-lies", lambda f: tar_gz(_with_header(f, _lie_shape)), "do not match its shape"),
    Case("header-offsets-lie", lambda f: tar_gz(_with_header(f, _lie_offsets)), "do not match its shape or the file"),
    Case("header-overlap", lambda f: tar_gz(_with_header(f, _overlap)), "overlaps another tensor"),
    Case("integer-dtype", lambda f: tar_gz(_with_header(f, _int_dtype)), "expected a float type"),
    Case("not-safetensors", lambda f: tar_gz({**f, WEIGHTS_FILE: b"\x80\x04" + b"x" * 100}), "header length"),
    Case("wrong-shape-for-base", lambda f: tar_gz(_tensors(f, _narrow)), "needs"),
    Case("unknown-module", lambda f: tar_gz(_tensors(f, _elsewhere)), "does not have"),
    Case("nan-weights", lambda f: tar_gz(_tensors(f, _poison(math.nan))), "NaN or Inf"),
    Case("inf-weights", lambda f: tar_gz(_tensors(f, _poison(math.inf))), "NaN or Inf"),
    # manifest
    Case("manifest-sha-mismatch", lambda f: tar_gz(_manifest(f, weights_sha256="0" * 64)), "does not match the sha256"),
    Case(
        "manifest-other-base",
        lambda f: tar_gz(_manifest(f, base_fingerprint="ffffffffffffffff")),
        "was trained on base",
    ),
    Case("manifest-not-json", lambda f: tar_gz({**f, MANIFEST_FILE: b"{nope"}), "is invalid"),
]

BAD_NAMES = [
    "../x",
    "..",
    "a/b",
    "/abs",
    "a..b",
    "UPPER",
    "x" * 65,
    "ѕymptoms",  # Cyrillic 's'
    "ｓymptoms",  # fullwidth 's'
    "symptoms\u200b",  # zero-width space
    ".hidden",
    "",
    "a b",
    "nul\x00x",
]

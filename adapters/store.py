"""The adapter store: the adapters shipped in the package plus a user directory.

Training writes into a store directory; the server and `loraswap eval` read from it. A user
adapter with the same name as a shipped one shadows it. Entries are plain folders (see
manifest.py), so a store shared by several processes needs no coordination beyond atomic renames.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import platformdirs

from loraswap.adapters.manifest import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    AdapterManifest,
    AdapterNotFound,
    check_name,
    fsync_dir,
    publish,
    read_manifest,
    staging_dir,
)

Source = Literal["shipped", "user", "registry"]
# resolve(): in an editable install __file__ is a link; the shipped folder is beside the real file.
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
ROUTER_FILE = "router.json"


def default_user_dir() -> Path:
    return Path(os.environ.get("LORASWAP_ADAPTERS_DIR") or platformdirs.user_data_dir("loraswap")) / "adapters"


@dataclass(frozen=True)
class StoreEntry:
    name: str
    path: Path
    source: Source
    manifest: AdapterManifest

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file() and not f.name.startswith("."))

    @property
    def created(self) -> int:
        """When the adapter got its name here (Unix seconds), for /v1/models."""
        return int(self.path.stat().st_mtime)

    def describe(self) -> dict[str, object]:
        return describe(self.name, self.manifest, self.size_bytes, self.source)


def describe(name: str, m: AdapterManifest, size_bytes: int, source: Source) -> dict[str, object]:
    """An adapter as the API and the CLI list it."""
    return {
        "name": name,
        "qtype": m.qtype,
        "method": m.method,
        "rank": m.rank,
        "alpha": m.alpha,
        "target_modules": m.target_modules,
        "size_bytes": size_bytes,
        "source": source,
        "base_id": m.base_id,
        "base_fingerprint": m.base_fingerprint,
        "prompt_format_version": m.prompt_format_version,
        "metrics": m.metrics,
        "created_at": m.created_at,
    }


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """The hint "; did you mean 'symptoms'?" naming up to three of `candidates` close to `name`, or "" when none is
    (for the not-found messages of the store and of the server)."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


def _load_entry(folder: Path, source: Source) -> StoreEntry:
    check_name(folder.name)
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / f).is_file():
            raise AdapterError(f"adapter {folder.name!r} has no {f}")
    return StoreEntry(folder.name, folder, source, read_manifest(folder))


@dataclass
class AdapterStore:
    user_dir: Path
    shipped_dir: Path | None = SHIPPED_DIR
    registry_dir: Path | None = None
    """A server's local copies of registry adapters (`adapters/replica.py`), when it serves a registry: read-only
    here, written by the replica only; a registry adapter shadows a user or shipped one of the same name."""

    @classmethod
    def default(
        cls, user_dir: Path | None = None, include_shipped: bool = True, registry_dir: Path | None = None
    ) -> AdapterStore:
        return cls(user_dir or default_user_dir(), SHIPPED_DIR if include_shipped else None, registry_dir)

    def _roots(self) -> tuple[tuple[Path | None, Source], ...]:
        """The folders searched, first match wins."""
        return ((self.registry_dir, "registry"), (self.user_dir, "user"), (self.shipped_dir, "shipped"))

    def _scan(self) -> tuple[dict[str, StoreEntry], dict[str, str]]:
        """(usable adapters, unusable folders with the reason). Hidden folders (staging, trash) are
        not adapters; a user adapter shadows a shipped one of the same name, a registry one both."""
        found: dict[str, StoreEntry] = {}
        problems: dict[str, str] = {}
        roots = self._roots()[::-1]
        for root, source in roots:
            if root is None or not root.is_dir():
                continue
            for folder in sorted(root.iterdir()):
                if folder.name.startswith(".") or not folder.is_dir():
                    continue
                try:
                    found[folder.name] = _load_entry(folder, source)
                except AdapterError as e:
                    problems[folder.name] = str(e)
        return found, problems

    def problems(self) -> dict[str, str]:
        """Folders that look like adapters but cannot be used, with the reason (for start-up reports)."""
        return self._scan()[1]

    def entries(self) -> dict[str, StoreEntry]:
        return self._scan()[0]

    def router_path(self) -> Path | None:
        """The qtype router for `"adapter": "auto"`: the user directory's, else the shipped one."""
        for root in (self.user_dir, self.shipped_dir):
            if root is not None and (root / ROUTER_FILE).is_file():
                return root / ROUTER_FILE
        return None

    def names(self) -> list[str]:
        return sorted(self.entries())

    def get(self, name: str) -> StoreEntry:
        """The adapter `name`, read from its own folder (user first, then shipped): a lookup costs the
        same however many adapters the store holds. Only a miss scans the store, for close names."""
        with contextlib.suppress(AdapterError):
            check_name(name)
            for root, source in self._roots():
                if root is not None and (root / name).is_dir():
                    with contextlib.suppress(AdapterError):
                        return _load_entry(root / name, source)
        entries = self.entries()
        hint = did_you_mean(name, entries)
        raise AdapterNotFound(f"adapter {name!r} not found{hint} (available: {', '.join(sorted(entries)) or 'none'})")

    def stage(self, name: str) -> Path:
        """A fresh hidden folder in the user directory to write the adapter `name` into; `add` publishes it."""
        return staging_dir(self.user_dir, check_name(name))

    def add(self, staged: Path, name: str, overwrite: bool = False) -> StoreEntry:
        """Publish the complete adapter folder `staged` (from `stage`) as the user adapter `name`: the one way an
        adapter enters a store, for uploads and training alike. The folder appears under its name whole, in one
        rename (`manifest.publish`); without `overwrite` an existing adapter of that name is a FileExistsError.
        Once publishing starts the staged folder is gone afterwards either way; a folder that is not one of this
        store's staging folders is refused untouched."""
        check_name(name)
        if staged.parent.resolve() != self.user_dir.resolve() or not staged.name.startswith(".tmp-"):
            raise ValueError(f"{staged} is not a staging folder of this store ({self.user_dir}); use stage()")
        final = self.user_dir / name
        publish(staged, final, overwrite=overwrite)
        return _load_entry(final, "user")

    def remove(self, name: str) -> None:
        """Delete a user adapter, also an unusable one: renamed aside first (atomic), then removed.
        Shipped adapters are read-only."""
        check_name(name)
        folder = self.user_dir / name
        if not folder.is_dir() or folder.is_symlink():
            self.get(name)  # AdapterNotFound for an unknown name; otherwise it is a shipped one
            raise AdapterError(f"adapter {name!r} is shipped with loraswap and cannot be removed")
        trash = self.user_dir / f".trash-{name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(folder, trash)
        except FileNotFoundError:  # removed by another request at the same moment
            raise AdapterNotFound(f"adapter {name!r} not found") from None
        fsync_dir(self.user_dir)
        shutil.rmtree(trash, ignore_errors=True)

"""A server's side of the registry: what the registry holds (listed in the background), and a local cache of the
adapters it pulled, bounded by bytes.

Consistency: the listing is refreshed every `poll_seconds` (one LIST request, plus one GET per record that changed).
So a replaced or deleted adapter is seen by every replica within `poll_seconds` plus one listing's time (the replica
that published or deleted it sees it at once). A new one is served at once everywhere: a request for a name the
listing lacks reads that name's record (one GET, at most once per `poll_seconds` for a name the registry lacks too),
so an adapter uploaded through one replica answers on the next one asked. A request for a listed adapter whose copy
here is missing or older is pulled before the request is queued: every blob checked against its sha256 and size,
then the full adapter validation (`registry.fetch`), then one atomic rename into the cache folder, which the workers
read like any store folder. A bad adapter is refused and remembered (by its record's ETag, so a fixed re-publish is
pulled again), never served.

Faults: while the registry cannot be listed, cached adapters keep answering (the last listing is kept) and a name
that would need a pull raises RegistryUnavailable, which the server answers with a 503.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraswap.adapters.manifest import AdapterManifest, AdapterNotFound, fsync_dir, publish, staging_dir
from loraswap.adapters.registry import AdapterRefused, Record, Registry, RegistryUnavailable, fetch
from loraswap.adapters.store import Source, describe

if TYPE_CHECKING:
    from loraswap.adapters.base import BaseRef

log = logging.getLogger(__name__)
RECORD_FILE = ".registry-record.json"
"""In each cached adapter folder: the ETag and size of the record it was pulled from."""


@dataclass(frozen=True)
class RegistryEntry:
    """A registry adapter as the API lists it (cached here or not)."""

    name: str
    record: Record
    source: Source = "registry"

    @property
    def manifest(self) -> AdapterManifest:
        return self.record.adapter

    @property
    def size_bytes(self) -> int:
        return self.record.size_bytes

    @property
    def created(self) -> int:
        try:
            return int(datetime.fromisoformat(self.record.published_at).timestamp())
        except ValueError:
            return 0

    def describe(self) -> dict[str, object]:
        return describe(self.name, self.manifest, self.size_bytes, self.source)


class Replica:
    """`ref` gives the served base (for validation); `max_bytes` bounds the cache (least recently used first out;
    at least the adapter just pulled stays); `on_pull` is told how long each pull took."""

    def __init__(
        self,
        registry: Registry,
        cache_dir: Path,
        ref: Callable[[], BaseRef],
        max_rank: int,
        max_bytes: int,
        poll_seconds: float = 2.0,
        on_pull: Callable[[float], None] | None = None,
    ) -> None:
        self.registry = registry
        self.on_pull = on_pull
        """Told the seconds of each pull (download, checks, validation, rename) that succeeded."""
        self.cache_dir = cache_dir
        self.ref = ref
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self.poll_seconds = poll_seconds
        self.listing: dict[str, Record] | None = None
        """The last listing that succeeded (None before the first)."""
        self.error: str | None = None
        """Why the last listing failed (None: it succeeded)."""
        self.refused: dict[str, tuple[str, str]] = {}
        """name -> (record ETag, why) of adapters refused at their last pull."""
        self._cached: dict[str, tuple[str, int]] = {}  # name -> (record ETag, bytes) of the copies here
        self._used: dict[str, float] = {}
        self._absent: dict[str, float] = {}  # name -> when the registry was last asked for it and had none
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._cache_lock = threading.RLock()  # the copies here: pulls (request threads) and drops (the listing)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.tried = threading.Event()
        """Set once the first listing has been tried (whether or not it succeeded)."""
        self._scan_cache()

    # -- the listing ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """List now, then every poll_seconds on a daemon thread (once per process)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._loop, name="loraswap-registry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sync()
            self._stop.wait(self.poll_seconds)

    @property
    def healthy(self) -> bool:
        return self.listing is not None and self.error is None

    def sync(self) -> None:
        """Refresh the listing; drop cached copies of adapters the registry no longer has."""
        try:
            self._sync()
        finally:
            self.tried.set()

    def _sync(self) -> None:
        try:
            etags = self.registry.list()
            old = self.listing or {}
            new: dict[str, Record] = {}
            for name, etag in etags.items():
                if name in old and old[name].etag == etag:
                    new[name] = old[name]
                    continue
                try:
                    new[name] = self.registry.record(name)
                except AdapterNotFound:
                    continue  # deleted between the list and the read
                except AdapterRefused as e:
                    self._refuse(name, etag, str(e))
        except RegistryUnavailable as e:
            if self.error is None:
                log.warning("loraswap: %s; cached adapters keep answering", e)
            self.error = str(e)
            return
        if self.error is not None:
            log.warning("loraswap: registry %s answers again", self.registry.uri)
        self.listing, self.error = new, None
        with self._cache_lock:
            gone = [name for name in self._cached if name not in new]
        for name in gone:
            self.drop(name)

    # -- resolving and pulling ----------------------------------------------------------------------------------

    def cached(self, name: str) -> bool:
        return name in self._cached

    def ready(self, name: str) -> bool:
        """Whether the cached copy of `name` is the version last listed (no I/O: the common request's check)."""
        listing = self.listing
        record = listing.get(name) if listing is not None and self.error is None else None
        if record is None or self._cached.get(name, ("", 0))[0] != record.etag:
            return False
        self._used[name] = time.monotonic()
        return True

    def ensure(self, name: str) -> bool:
        """Whether `name` is a registry adapter, with a verified copy of its current version in the cache after
        this returns. Blocking (it may pull): call it off the event loop. Raises RegistryUnavailable when that
        cannot be known or the pull fails and no copy is cached, AdapterRefused for a bad adapter."""
        if self.listing is None:
            self.sync()  # the first request before the first listing
        listing = self.listing
        if listing is None or self.error is not None:
            if name in self._cached:
                self._used[name] = time.monotonic()
                return True
            why = self.error or f"registry {self.registry.uri} has not been listed yet"
            raise RegistryUnavailable(f"adapter {name!r} is not cached here and the registry cannot be read: {why}")
        record = listing.get(name) or self._published_since(name)
        if record is None:
            return False
        refused = self.refused.get(name)
        if refused is not None and refused[0] == record.etag:
            raise AdapterRefused(refused[1])
        with self._lock:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:  # one pull per name at a time; the others wait for it
            if self._cached.get(name, ("", 0))[0] != record.etag:
                try:
                    self._pull(record)
                except RegistryUnavailable:
                    if name not in self._cached:
                        raise
                    log.warning("loraswap: %r could not be pulled again; serving the copy cached before", name)
        self._used[name] = time.monotonic()
        return True

    def _published_since(self, name: str) -> Record | None:
        """The record of `name` if it was published after the last listing (None if not, or if that cannot be read
        now: the listing stands). A name the registry lacks is not asked again for `poll_seconds`."""
        now = time.monotonic()
        asked = self._absent.get(name)
        if asked is not None and now - asked < self.poll_seconds:
            return None
        try:
            record = self.registry.record(name)
        except AdapterRefused:
            raise  # a malformed record: refused, as the listing would
        except (AdapterNotFound, RegistryUnavailable, ValueError):  # ValueError: not a name the registry can hold
            self._absent[name] = now
            if len(self._absent) > 4096:  # names asked for and absent: bounded, the oldest forgotten first
                self._absent.pop(next(iter(self._absent)), None)  # None: another request thread took it
            return None
        with self._cache_lock:
            if self.listing is not None:
                self.listing = {**self.listing, name: record}
        return record

    def _pull(self, record: Record) -> None:
        start = time.perf_counter()
        staged = staging_dir(self.cache_dir, record.name)
        try:
            fetch(self.registry, record, staged, self.ref(), self.max_rank)
            self.add(staged, record)
        except AdapterRefused as e:
            self._refuse(record.name, record.etag, str(e))
            raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        seconds = time.perf_counter() - start
        log.info("loraswap: pulled %r from %s in %.0f ms", record.name, self.registry.uri, 1e3 * seconds)
        if self.on_pull is not None:
            self.on_pull(seconds)

    def add(self, staged: Path, record: Record) -> None:
        """Make the verified folder `staged` (in the cache folder) the cached copy of `record`, in one rename."""
        (staged / RECORD_FILE).write_text(json.dumps({"etag": record.etag, "size": record.size_bytes}))
        with self._cache_lock:
            publish(staged, self.cache_dir / record.name, overwrite=True)
            self._cached[record.name] = (record.etag, record.size_bytes)
            self._used[record.name] = time.monotonic()
            if self.listing is not None:
                self.listing = {**self.listing, record.name: record}
            self.refused.pop(record.name, None)
            self._evict(keep=record.name)

    def _refuse(self, name: str, etag: str, why: str) -> None:
        if self.refused.get(name, ("", ""))[0] != etag:
            log.error("loraswap: refused adapter %r from %s: %s", name, self.registry.uri, why)
        self.refused[name] = (etag, why)

    # -- the cache ----------------------------------------------------------------------------------------------

    def _scan_cache(self) -> None:
        """The copies a previous run left (unfinished pulls are removed): they answer while the registry is down."""
        if not self.cache_dir.is_dir():
            return
        for folder in sorted(self.cache_dir.iterdir()):
            if folder.name.startswith("."):
                if folder.is_dir() and folder.name.startswith((".tmp-", ".trash-", ".old-")):
                    shutil.rmtree(folder, ignore_errors=True)
                continue
            try:
                info: dict[str, Any] = json.loads((folder / RECORD_FILE).read_text())
                self._cached[folder.name] = (str(info["etag"]), int(info["size"]))
                self._used[folder.name] = (folder / RECORD_FILE).stat().st_mtime - time.time() + time.monotonic()
            except (OSError, ValueError, KeyError, TypeError):
                shutil.rmtree(folder, ignore_errors=True)  # not a complete copy: pulled again when asked for

    def drop(self, name: str) -> bool:
        """Remove the cached copy of `name` (a worker that has it loaded keeps it until its own LRU evicts it)."""
        with self._cache_lock:
            self._cached.pop(name, None)
            self._used.pop(name, None)
            folder = self.cache_dir / name
            if not folder.is_dir():
                return False
            trash = self.cache_dir / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(folder, trash)
            except FileNotFoundError:
                return False
        fsync_dir(self.cache_dir)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def cache_bytes(self) -> int:
        with self._cache_lock:
            return sum(size for _, size in self._cached.values())

    def _evict(self, keep: str) -> None:
        """Drop the least recently used copies (never `keep`) while the cache is over its bound; holds the lock."""
        while self.cache_bytes() > self.max_bytes and len(self._cached) > 1:
            victim = min((n for n in self._cached if n != keep), key=lambda n: self._used.get(n, 0.0))
            log.info("loraswap: cache over %d bytes; dropping the copy of %r", self.max_bytes, victim)
            self.drop(victim)

    # -- publishing from this server -----------------------------------------------------------------------------

    def upload(self, data: bytes, name: str, overwrite: bool, max_bytes: int) -> Record:
        """An uploaded archive: validated exactly as the local store's uploads, published to the registry, and
        cached here at once (so this replica serves it without waiting for the next listing)."""
        from loraswap.adapters.archive import prepare_archive

        staged = staging_dir(self.cache_dir, name)
        try:
            prepare_archive(data, name, staged, self.ref(), self.max_rank, max_bytes)
            record = self.registry.push(staged, name, overwrite=overwrite)
            self.add(staged, record)
            return record
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def remove(self, name: str) -> None:
        """Unpublish `name` from the registry and drop the copy here (AdapterNotFound when it is not published)."""
        self.registry.remove(name)
        if self.listing is not None:
            self.listing = {n: r for n, r in self.listing.items() if n != name}
        self.drop(name)

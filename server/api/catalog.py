"""What the API process serves: the base, and the store's adapters made for it that passed the start-up check.

Every lookup reads the store on disk (uploads and deletes are atomic renames there), so every API process and
worker sees the same adapters; nothing here is a copy that could go stale, except the router, which is reloaded
when its file changes.

With a registry (`Settings.registry`), its adapters are served too (they shadow local ones of the same name):
`resolve` pulls one into this server's cache before its request is queued (`adapters/replica.py`), and the listing
it follows is at most `registry_poll_seconds` old.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from loraswap.adapters.base import BaseRef, resolve_base
from loraswap.adapters.hub import is_hub_name
from loraswap.adapters.manifest import AdapterError, AdapterNotFound
from loraswap.adapters.registry import AdapterRefused, RegistryUnavailable
from loraswap.adapters.replica import RegistryEntry, Replica
from loraswap.adapters.store import StoreEntry, did_you_mean
from loraswap.server.api.errors import APIError, from_registry
from loraswap.server.jobs import BASE
from loraswap.server.settings import Settings

BASE_NAMES = ("base", BASE)
"""The names a request may give the base by (besides its own id)."""


class Catalog:
    def __init__(
        self, settings: Settings, unusable: dict[str, str] | None = None, on_pull: Callable[[float], None] | None = None
    ) -> None:
        """`on_pull`: told the seconds of each registry pull (the metrics' histogram)."""
        self.settings = settings
        self.on_pull = on_pull
        self.unusable = dict(unusable or {})  # adapters that failed the start-up check: name -> why
        self._ref: BaseRef | None = None
        self._router: tuple[tuple[str, int], Any] | None = None  # ((path, mtime), Router)
        self._replica: tuple[int, Replica] | None = None  # (pid, the registry's replica in that process)

    def __getstate__(self) -> dict[str, Any]:
        # The workers read the cache folder, never the registry (and metrics stay in the API process).
        return {**self.__dict__, "_replica": None, "on_pull": None}

    @property
    def replica(self) -> Replica | None:
        """The registry's replica in this process, listing in the background (None without a registry)."""
        s = self.settings
        if not s.registry:
            return None
        if self._replica is None or self._replica[0] != os.getpid():
            from loraswap.adapters.registry import Registry

            registry = Registry(s.registry, s.registry_conditional_writes, s.registry_timeout)
            cache = s.registry_dir() or s.store().user_dir / ".registry"  # registry_dir is set with the registry
            replica = Replica(
                registry,
                cache,
                lambda: self.ref,
                s.max_rank,
                s.registry_cache_bytes,
                s.registry_poll_seconds,
                self.on_pull,
            )
            self._replica = (os.getpid(), replica)
            replica.start()
        return self._replica[1]

    @property
    def ref(self) -> BaseRef:
        if self._ref is None:
            self._ref = resolve_base(self.settings.base)
        return self._ref

    @property
    def quant(self) -> dict[str, Any]:
        """How the workers hold the base (reported with the base's entry of /v1/models)."""
        s = self.settings
        return {"quant": s.quant, "double_quant": s.double_quant if s.quant in ("nf4", "fp4") else None}

    def entries(self) -> dict[str, StoreEntry | RegistryEntry]:
        """The adapters served: the store's, for this base, less the unusable ones; and the registry's (as last
        listed, less those refused)."""
        fp = self.ref.fingerprint
        served: dict[str, StoreEntry | RegistryEntry] = {
            n: e
            for n, e in self.settings.store(with_registry=False).entries().items()
            if e.manifest.base_fingerprint == fp and n not in self.unusable
        }
        replica = self.replica
        if replica is not None:
            # A server's first listing of its adapters waits for its first listing of the registry (once).
            replica.tried.wait(2 * self.settings.registry_timeout + 1)
            for name, record in (replica.listing or {}).items():
                if record.adapter.base_fingerprint == fp and replica.refused.get(name, ("",))[0] != record.etag:
                    served[name] = RegistryEntry(name, record)
        return served

    async def resolve(self, name: str, param: str) -> str | None:
        """`lookup`, after making sure a registry adapter is pulled, verified and cached here: 503 when the registry
        is needed and cannot be reached, 502 when what it holds is refused."""
        if is_hub_name(name):
            return await self._hub(name, param)
        replica = self.replica
        if replica is not None and name not in BASE_NAMES and name != self.ref.base_id:
            try:
                if replica.ready(name) or await asyncio.to_thread(replica.ensure, name):
                    return name
            except RegistryUnavailable as e:
                if not self._local(name):
                    raise from_registry(e, param) from None
            except AdapterRefused as e:
                raise from_registry(e, param) from None
        return self.lookup(name, param)

    async def _hub(self, model: str, param: str) -> str:
        """A hub adapter (`hf:org/name`), installed into the local store on its first request."""
        from loraswap.adapters import hub

        if not self.settings.hub_adapters:
            raise APIError(
                404,
                f"adapter {model!r}: hub adapters are not served here (LORASWAP_HUB_ADAPTERS=true allows them)",
                "not_found_error",
                param=param,
                code="model_not_found",
            )
        try:
            name = hub.local_name(model)
            if not self._local(name):
                store = self.settings.store(with_registry=False)
                await asyncio.to_thread(hub.install, model, store, self.ref, self.settings.max_rank)
        except AdapterNotFound as e:
            raise APIError(404, str(e), "not_found_error", param=param, code="model_not_found") from None
        except AdapterError as e:  # not a hub name, or the adapter fails validation
            raise APIError(422 if "hub adapter name" not in str(e) else 400, str(e), param=param) from None
        except RegistryUnavailable as e:
            raise from_registry(e, param) from None
        return self.lookup(name, param) or name

    def _local(self, name: str) -> bool:
        try:
            self.settings.store(with_registry=False).get(name)
            return True
        except AdapterNotFound:
            return False

    def lookup(self, name: str, param: str) -> str | None:
        """None for the base; the adapter's name if it exists for this base; else 404 with close names
        (`param`: the request field that named it)."""
        if name in BASE_NAMES or name == self.ref.base_id:
            return None
        if name in self.unusable:
            raise APIError(
                404,
                f"adapter {name!r} is not served: it failed the start-up check ({self.unusable[name]}); "
                "upload it again with overwrite=true, or delete it",
                param=param,
                code="adapter_unusable",
            )
        try:
            if self.settings.store().get(name).manifest.base_fingerprint == self.ref.fingerprint:
                return name  # the common case reads one folder, not the whole store
        except AdapterNotFound:
            pass  # answered below, with the names this server does serve
        entries = self.entries()
        listed = sorted(entries)[:20] + (["..."] if len(entries) > 20 else [])
        raise APIError(
            404,
            f"adapter {name!r} not found{did_you_mean(name, entries)} "
            f"(available: base, {', '.join(listed)}; GET /v1/models lists all)",
            "not_found_error",
            param=param,
            code="model_not_found",
        )

    def has_router(self) -> bool:
        return self.settings.store().router_path() is not None

    async def route(self, question: str, param: str = "adapter") -> tuple[str | None, dict[str, Any]]:
        """adapter 'auto': the router's qtype, served by an adapter of that qtype (the base if none, resolved as
        `resolve` does); with what the router said (`param`: the request field that said 'auto')."""
        qtype, prob = self.ranked(question, param)[0]
        name = self.qtype_adapter(qtype)
        adapter = await self.resolve(name, param) if name else None
        return adapter, {"qtype": qtype, "probability": round(prob, 4)}

    def qtype_adapter(self, qtype: str) -> str | None:
        """The LoRA adapter that serves `qtype` (the first by name), or None."""
        names = sorted(
            n for n, e in self.entries().items() if e.manifest.qtype == qtype and e.manifest.method == "lora"
        )
        return names[0] if names else None

    def ranked(self, question: str, param: str = "adapter") -> list[tuple[str, float]]:
        """The router's qtypes for `question` with their probabilities, the most likely first (400 without a
        router)."""
        from loraswap.adapters.router import Router

        path = self.settings.store().router_path()
        if path is None:
            raise APIError(
                400,
                f"{param} 'auto' needs a router (loraswap train-router); none is installed",
                param=param,
                code="no_router",
            )
        key = (str(path), path.stat().st_mtime_ns)
        if self._router is None or self._router[0] != key:
            self._router = (key, Router.load(path))
        ranked: list[tuple[str, float]] = self._router[1].ranked(question)
        return ranked

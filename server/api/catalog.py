"""What the API process serves: the base, and the store's adapters made for it that passed the start-up check.

Every lookup reads the store on disk (uploads and deletes are atomic renames there), so every API process and
worker sees the same adapters; nothing here is a copy that could go stale, except the router, which is reloaded
when its file changes.
"""

from __future__ import annotations

from typing import Any

from loraswap.adapters.base import BaseRef, resolve_base
from loraswap.adapters.manifest import AdapterNotFound
from loraswap.adapters.store import StoreEntry, did_you_mean
from loraswap.server.api.errors import APIError
from loraswap.server.jobs import BASE
from loraswap.server.settings import Settings

BASE_NAMES = ("base", BASE)
"""The names a request may give the base by (besides its own id)."""


class Catalog:
    def __init__(self, settings: Settings, unusable: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.unusable = dict(unusable or {})  # adapters that failed the start-up check: name -> why
        self._ref: BaseRef | None = None
        self._router: tuple[tuple[str, int], Any] | None = None  # ((path, mtime), Router)

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

    def entries(self) -> dict[str, StoreEntry]:
        """The adapters served: the store's, for this base, less the unusable ones."""
        fp = self.ref.fingerprint
        return {
            n: e
            for n, e in self.settings.store().entries().items()
            if e.manifest.base_fingerprint == fp and n not in self.unusable
        }

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

    def route(self, question: str) -> tuple[str | None, dict[str, Any]]:
        """adapter 'auto': the router's qtype, served by an adapter of that qtype (the base if none); with what
        the router said."""
        qtype, prob = self.ranked(question)[0]
        return self.qtype_adapter(qtype), {"qtype": qtype, "probability": round(prob, 4)}

    def qtype_adapter(self, qtype: str) -> str | None:
        """The LoRA adapter that serves `qtype` (the first by name), or None."""
        names = sorted(
            n for n, e in self.entries().items() if e.manifest.qtype == qtype and e.manifest.method == "lora"
        )
        return names[0] if names else None

    def ranked(self, question: str) -> list[tuple[str, float]]:
        """The router's qtypes for `question` with their probabilities, the most likely first (400 without a
        router)."""
        from loraswap.adapters.router import Router

        path = self.settings.store().router_path()
        if path is None:
            raise APIError(
                400,
                "adapter 'auto' needs a router (loraswap train-router); none is installed",
                param="adapter",
                code="no_router",
            )
        key = (str(path), path.stat().st_mtime_ns)
        if self._router is None or self._router[0] != key:
            self._router = (key, Router.load(path))
        ranked: list[tuple[str, float]] = self._router[1].ranked(question)
        return ranked

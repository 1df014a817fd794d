"""Server settings: defaults, overridden by LORASWAP_* environment variables (read once) and CLI options.

Both processes read them (the API process and every worker), so this module holds the closed choices as plain
`Literal`s and imports neither torch nor the worker's kernel code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator

from loraswap.adapters.base import Quant
from loraswap.adapters.store import AdapterStore

LoraImpl = Literal["batched", "peft"]
"""How a worker computes LoRA rows (`Settings.lora_impl`)."""
LmHead = Literal["auto", "float32", "bfloat16"]
"""The LM head's compute dtype on CPU (`Settings.lm_head`, `server/worker/fastpath.py`)."""
Q4Kernel = Literal["auto", "bitsandbytes", "float32", "bfloat16", "int8"]
"""The kernel of the 4-bit layers on CPU (`Settings.q4_kernel`, `server/worker/fastpath.py`, `server/worker/q4.py`)."""

PREFIX_CACHE_BYTES = 256 << 20
"""The default bound on a worker's cached prompt blocks (`LORASWAP_PREFIX_CACHE_BYTES`, `server/worker/prefix.py`):
room for 64 adapters' system turns on the embedded base (1.05 MiB each) and their questions' first blocks."""


class Settings(BaseModel):
    """Server settings; `from_env` reads LORASWAP_* once, at start-up."""

    host: str = "127.0.0.1"
    port: int = 8000
    base: str = "embedded"
    quant: Quant = "nf4"
    """How the base is held: nf4 or fp4 (bitsandbytes 4-bit), int8 (LLM.int8) or none (dense)."""
    double_quant: bool = True
    """4-bit only: quantize the blocks' scales too."""
    adapters_dir: Path | None = None
    workers: int = 1
    max_batch_size: int = 16
    max_prefill_tokens: int = 1024
    """Prompt tokens prefilled together in one step (at least one request): bounds how long running
    requests wait while new ones join."""
    prefix_cache_bytes: int = PREFIX_CACHE_BYTES
    """Bytes of prompt-prefix keys and values a worker keeps for reuse (0: no prefix caching). Each adapter has its
    own: the 24-token system turn alone is 1.05 MiB per adapter on the embedded base (30 layers, 3 key-value heads
    of 64 floats), so 64 MiB could not hold 64 adapters' system turns, and traffic over 64 adapters evicted the
    blocks traffic over 16 would reuse (its time to first token doubled in `loraswap bench`; see BENCHMARKS.md)."""
    short_first_steps: int = Field(3, ge=0)
    """While short requests (max_tokens at most a quarter of the largest running) run beside longer ones, up to
    this many decoding steps in a row run the short ones alone; then one step runs every request. 0: every step
    runs every request (the most tokens per second, the slowest short answers beside long ones)."""
    join_in_step: bool = True
    """Requests whose prompts are mostly in the prefix cache join the running requests' decoding forward instead of
    a prefill of their own, where the padding that costs the running rows is small (`server/worker/joining.py`).
    False: every step that admits requests runs a prefill, then the decoding step."""
    max_tokens: int = 1024
    """Largest max_tokens a request may ask for."""
    max_loaded_adapters: int = 32
    max_loaded_bytes: int = 1 << 30
    """Bytes of adapter files a worker keeps loaded (with max_loaded_adapters, the LRU's bounds)."""
    max_upload_bytes: int = 64 << 20
    max_body_bytes: int = 1 << 20
    max_rank: int = 64
    api_key: SecretStr | None = None
    admin_key: SecretStr | None = None
    lora_impl: LoraImpl = "batched"
    """How LoRA rows are computed: "batched" (adapter slots, gathered matmuls) or "peft" (PEFT's reference path)."""
    lm_head: LmHead = "auto"
    """The output projection's compute dtype on CPU: "auto" (bf16 where the CPU has native bf16 dot products and
    a bf16 matmul measures faster there at the batch size, with each position's top logits recomputed in float32),
    "float32" or "bfloat16" (`server/worker/fastpath.py`)."""
    q4_kernel: Q4Kernel = "auto"
    """The kernel of the 4-bit layers on CPUs with AVX512-BF16: "auto" (the fastest at the batch size, timed at
    start-up), "bitsandbytes" (its fused kernel, one row at a time), "float32" or "bfloat16" (loraswap's, a tile
    of weights dequantized once for 8 rows), or "int8" (loraswap's on inputs rounded to int8 per block, integer
    dot products, as llama.cpp computes: AVX512-VNNI) (`server/worker/q4.py`)."""
    threads: int | None = Field(None, ge=1)
    """Compute threads of a CPU worker, fixed. Unset: as many as the worker may use (its CPU affinity mask, no more
    than its cgroup's CPU quota), one fewer while other processes keep its threads waiting for a CPU, and back
    when a CPU stays idle (`server/worker/threads.py`). CUDA workers keep torch's default."""
    max_mix: int = Field(4, ge=1, le=16)
    """The most adapters one request may mix (`"adapter": {name: weight}`, `"adapters": [...]`, route "soft")."""
    drain_seconds: int = 30
    """On SIGTERM, how long running requests may take to finish."""
    registry: str | None = None
    """An adapter registry shared by several servers, `s3://BUCKET/PREFIX` (`adapters/registry.py`): uploads and
    deletes go there, and adapters are pulled from it on first use. Unset: the local store only."""
    registry_cache_dir: Path | None = None
    """Where this server keeps the registry adapters it pulled (default: the user cache folder, per registry)."""
    registry_cache_bytes: int = Field(4 << 30, ge=1)
    """Bytes of pulled adapters kept on local disk (least recently used out first)."""
    registry_poll_seconds: float = Field(2.0, gt=0)
    """How often the registry is listed: the bound on how stale this server's view of it is."""
    registry_timeout: float = Field(5.0, gt=0)
    """Seconds a registry request may take (connect, read) before it counts as unavailable."""
    registry_conditional_writes: bool = True
    """Publish with If-None-Match / If-Match (one winner of a race, the others get a 409); false for stores that do
    not support conditional writes (then racing publishers of one name end with the last one's adapter)."""
    hub_adapters: bool = False
    """Serve `hf:org/name` adapters from the Hugging Face hub, downloaded on first use."""

    @field_validator("registry")
    @classmethod
    def _registry_uri(cls, v: str | None) -> str | None:
        if v:
            from loraswap.adapters.registry import RegistryURI

            return str(RegistryURI.parse(v))
        return None

    cors_origins: list[str] = []
    """Web origins (scheme://host[:port]) whose browser pages may call the API, comma-separated in
    LORASWAP_CORS_ORIGINS; "*" allows any. Empty (the default): no CORS headers, so browsers refuse other origins."""

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, v: Any) -> Any:
        if isinstance(v, str):  # from the environment or the CLI: comma-separated
            v = [o.strip() for o in v.split(",") if o.strip()]
        for o in v if isinstance(v, list) else ():
            if o != "*" and not (isinstance(o, str) and o.startswith(("http://", "https://")) and "/" not in o[8:]):
                raise ValueError(f"{o!r} is not an origin: scheme://host[:port] (no path), or *")
        return v

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        env = {k.removeprefix("LORASWAP_").lower(): v for k, v in os.environ.items() if k.startswith("LORASWAP_")}
        fields = set(cls.model_fields)
        values: dict[str, Any] = {k: v for k, v in env.items() if k in fields}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)

    def registry_dir(self) -> Path | None:
        """The folder of this server's copies of registry adapters (None without a registry)."""
        if not self.registry:
            return None
        if self.registry_cache_dir is not None:
            return self.registry_cache_dir
        import platformdirs

        from loraswap.adapters.registry import RegistryURI

        uri = RegistryURI.parse(self.registry)
        return Path(platformdirs.user_cache_dir("loraswap")) / "registry" / uri.bucket / (uri.prefix or "_")

    def store(self, with_registry: bool = True) -> AdapterStore:
        return AdapterStore.default(self.adapters_dir, registry_dir=self.registry_dir() if with_registry else None)

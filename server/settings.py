"""Server settings: defaults, overridden by LORASWAP_* environment variables (read once) and CLI options.

Both processes read them (the API process and every worker), so this module holds the closed choices as plain
`Literal`s and imports neither torch nor the worker's kernel code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr

from loraswap.adapters.base import Quant
from loraswap.adapters.store import AdapterStore

LoraImpl = Literal["batched", "peft"]
"""How a worker computes LoRA rows (`Settings.lora_impl`)."""
LmHead = Literal["auto", "float32", "bfloat16"]
"""The LM head's compute dtype on CPU (`Settings.lm_head`, `server/worker/fastpath.py`)."""
Q4Kernel = Literal["auto", "bitsandbytes", "float32", "bfloat16"]
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
    of weights dequantized once for 8 rows: `server/worker/q4.py`)."""
    threads: int | None = Field(None, ge=1)
    """Compute threads of a CPU worker, fixed. Unset: as many as the worker may use (its CPU affinity mask, no more
    than its cgroup's CPU quota), one fewer while other processes keep its threads waiting for a CPU, and back
    when a CPU stays idle (`server/worker/threads.py`). CUDA workers keep torch's default."""
    max_mix: int = Field(4, ge=1, le=16)
    """The most adapters one request may mix (`"adapter": {name: weight}`, `"adapters": [...]`, route "soft")."""
    drain_seconds: int = 30
    """On SIGTERM, how long running requests may take to finish."""

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        env = {k.removeprefix("LORASWAP_").lower(): v for k, v in os.environ.items() if k.startswith("LORASWAP_")}
        fields = set(cls.model_fields)
        values: dict[str, Any] = {k: v for k, v in env.items() if k in fields}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)

    def store(self) -> AdapterStore:
        return AdapterStore.default(self.adapters_dir)

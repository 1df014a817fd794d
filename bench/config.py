"""What one `loraswap bench` run does: the server, the traffic and the size of every scenario."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class BenchConfig:
    url: str | None = None
    """A running server to measure; None starts one (and stops it at the end)."""
    base: str = "embedded"
    quant: str = "nf4"
    double_quant: bool = True
    """4-bit only: bitsandbytes double quantization."""
    max_batch_size: int = 16
    lora_impl: str | None = None
    """LoRA path of the server started here (None: the server's default)."""
    clients: int = 16
    """Concurrent clients of the closed-loop scenarios."""
    max_tokens: int = 64
    rounds: int = 3
    per_slice: int | None = None
    """Requests per scenario per round (closed loop); None: two per client."""
    adapters: int = 64
    naive_per_round: int = 2
    cold_per_round: int = 4
    uploads_per_round: int = 2
    short_tokens: int = 16
    long_tokens: int = 256
    shorts_per_round: int = 6
    short_clients: int = 2
    short_deadline: float = 120.0
    """Seconds the short requests may take beside the long ones before the rest count as unfinished (llama-server
    serves one LoRA set at a time, so its short requests can wait behind the long ones for as long as they come)."""
    rates: tuple[float, ...] = (0.25, 0.5, 0.75)
    """Open-loop arrival rates, as fractions of the measured single-adapter capacity."""
    open_loop_requests: int = 16
    churn_cycles: int = 10_000
    """Adapter load/evict cycles of the in-process churn test (0: skip)."""
    reference: bool = True
    """Run llama.cpp when llama-cpp-python is installed."""
    peer: bool = True
    """Run the llama-server scenarios beside loraswap's where llama-server is built (`make llama-server`)."""
    peer_only: bool = False
    """Only the scenarios llama-server runs too (base, single, mixed16, mixed64, short beside long), and its."""
    llama_server: str | None = None
    """The llama-server binary; None: the one `make llama-server` built."""
    api_key: str | None = None
    admin_key: str | None = None
    seed: int = 0

    @classmethod
    def quick(cls, **kw: Any) -> BenchConfig:
        """Every scenario, small: under 3 minutes on 2 CPU cores."""
        small = {
            "max_tokens": 16,
            "rounds": 1,
            "per_slice": kw.get("clients", 8),
            "naive_per_round": 2,
            "cold_per_round": 3,
            "uploads_per_round": 2,
            "short_tokens": 8,
            "long_tokens": 64,
            "shorts_per_round": 4,
            "rates": (0.5,),
            "open_loop_requests": 6,
            "churn_cycles": 500,
        }
        return cls(**{**small, **kw})

"""loraswap: one 4-bit base LLM, many LoRA adapters, chosen per request."""

__version__ = "0.1.0"

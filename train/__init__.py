"""Training: per-qtype QLoRA adapters from question/answer data, and held-out evaluation."""

"""The adapter server (LitServe)."""

"""Load tests and benchmarks: `loraswap bench` drives a running (or self-started) server over HTTP."""

"""A worker process of the server: the base model, the engine that batches requests over it, and their kernels."""

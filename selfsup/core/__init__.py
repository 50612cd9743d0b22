"""The bottom layer: the config engine, I/O and hashing, torch.distributed helpers, process launch,
stage plumbing, MLflow tracking.

A layer of ``selfsup``: it imports only itself and the layers before it in ``selfsup.LAYERS``."""

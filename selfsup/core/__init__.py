"""The bottom layer: the config engine, I/O and hashing, torch.distributed helpers, process launch, stage plumbing, MLflow tracking.

Layer 0 of ``selfsup`` (see ``selfsup/__init__.py``): it imports only the layers below it."""

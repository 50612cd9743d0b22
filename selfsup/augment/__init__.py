"""Batched, seeded augmentation on the training device; patch masks; colour spaces and colour bins.

A layer of ``selfsup``: it imports only itself and the layers before it in ``selfsup.LAYERS``."""

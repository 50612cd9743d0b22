"""Batched, seeded augmentation on the training device; patch masks; colour spaces and colour bins.

Layer 1 of ``selfsup`` (see ``selfsup/__init__.py``): it imports only the layers below it."""

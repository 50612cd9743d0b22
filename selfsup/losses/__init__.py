"""Losses as pure functions or small modules, one file per family, each tested against a slow reference.

Layer 4 of ``selfsup`` (see ``selfsup/__init__.py``): it imports only the layers below it."""

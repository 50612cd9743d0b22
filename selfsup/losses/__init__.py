"""Losses as pure functions or small modules, one file per family, each tested against a slow
reference.

A layer of ``selfsup``: it imports only itself and the layers before it in ``selfsup.LAYERS``."""

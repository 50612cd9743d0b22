"""Datasets: the download sources, the prepared format read back, loaders, generated test folders, the
pre-run check.

A layer of ``selfsup``: it imports only itself and the layers before it in ``selfsup.LAYERS``."""

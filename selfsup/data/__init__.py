"""Datasets: the download sources, the prepared format read back, loaders, generated test folders, the pre-run check.

Layer 2 of ``selfsup`` (see ``selfsup/__init__.py``): it imports only the layers below it."""

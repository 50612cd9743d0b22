"""The results tables, plots and the papers' numbers beside ours.

A layer of ``selfsup``: it imports only itself and the layers before it in ``selfsup.LAYERS``."""

"""The results tables, plots and the papers' numbers beside ours.

Layer 9 of ``selfsup`` (see ``selfsup/__init__.py``): it imports only the layers below it."""

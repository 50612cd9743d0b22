"""k-means, PCA-whitening, Sinkhorn-Knopp, cluster samplers and clustering metrics.

Layer 5 of ``selfsup`` (see ``selfsup/__init__.py``): it imports only the layers below it."""

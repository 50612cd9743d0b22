"""k-means, PCA-whitening, Sinkhorn-Knopp, cluster samplers and clustering metrics.

A layer of ``selfsup``: it imports only itself and the layers before it in ``selfsup.LAYERS``."""

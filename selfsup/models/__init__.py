"""Networks and their parts: backbones (CNNs, ViTs), heads, momentum targets, the memory bank,
prototypes, visual tokenisers, feature extraction.

A layer of ``selfsup``: it imports only itself and the layers before it in ``selfsup.LAYERS``."""

"""Networks and their parts: backbones (CNNs, ViTs), heads, momentum targets, the memory bank, prototypes, visual tokenisers, feature extraction.

Layer 3 of ``selfsup`` (see ``selfsup/__init__.py``): it imports only the layers below it."""

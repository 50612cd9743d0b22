"""Evaluation of trained encoders: kNN, linear probes (frozen features, augmented, per layer, the ViT
protocols), fine-tuning, clustering, the evaluate stage's loop, InstDisc's Table 1.

A layer of ``selfsup``: it imports only itself and the layers before it in ``selfsup.LAYERS``."""

"""Evaluation of trained encoders: kNN, linear probes (frozen features, augmented, per layer, the ViT protocols), fine-tuning, clustering, the evaluate stage's loop, InstDisc's Table 1.

Layer 7 of ``selfsup`` (see ``selfsup/__init__.py``): it imports only the layers below it."""

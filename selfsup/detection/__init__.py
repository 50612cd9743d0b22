"""PASCAL VOC detection transfer: the data, the Faster R-CNN on a backbone, the VOC AP.

A layer of ``selfsup``: it imports only itself and the layers before it in ``selfsup.LAYERS``."""

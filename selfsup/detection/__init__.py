"""PASCAL VOC detection transfer: the data, the Faster R-CNN on a backbone, the VOC AP.

Layer 8 of ``selfsup`` (see ``selfsup/__init__.py``): it imports only the layers below it."""

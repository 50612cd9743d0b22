"""Generated image folders for tests and benchmarks: JPEGs of different sizes in the
``train/<class>/*`` + ``test/<class>/*`` layout (or an unlabelled ``train/``), with a class signal a
network can learn (each class its own stripe orientation, on random colours, discs and noise),
written one file at a time."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _image(rng: np.random.Generator, cls: int, n_classes: int, h: int, w: int) -> np.ndarray:
    """uint8 (h, w, 3): stripes at a class angle on a random colour gradient, a few random discs
    and pixel noise (varied enough that features are not low-rank)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = np.pi * (cls + rng.uniform(-0.15, 0.15)) / max(n_classes, 1)
    period = rng.uniform(3.0, 8.0)
    stripes = 0.5 + 0.5 * np.sin((np.cos(ang) * xx + np.sin(ang) * yy) * (2 * np.pi / period) + rng.uniform(0, 6.3))
    c0, c1 = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
    t = (xx / max(w - 1, 1))[..., None]
    img = (c0 * (1 - t) + c1 * t) * (0.55 + 0.45 * stripes[..., None])
    for _ in range(int(rng.integers(1, 4))):  # random discs
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, max(3.0, min(h, w) / 3))
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 1, 3)
    img = img + rng.normal(0, 0.05, (h, w, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_image_folder(root: str | Path, n_train: int, n_test: int, classes: int = 3, size: tuple[int, int] = (20, 48),
                      seed: int = 0, labelled: bool = True, quality: int = 90) -> Path:
    """Write ``n_train`` / ``n_test`` JPEGs (sides drawn in ``size``, height and width apart) under
    ``root``; ``labelled=False`` puts the training images directly in ``train/`` (label -1).
    Returns ``root``."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            c = i % classes
            h, w = (int(v) for v in rng.integers(size[0], size[1] + 1, 2))
            folder = root / split / (f"class{c}" if labelled or split == "test" else "")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_image(rng, c, classes, h, w)).save(folder / f"{i:06d}.jpg", quality=quality)
    return root

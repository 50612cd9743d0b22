"""Generated image folders for tests and benchmarks: JPEGs of different sizes in the
``train/<class>/*`` + ``test/<class>/*`` layout (or an unlabelled ``train/``), with a class signal a
network can learn (each class its own colour and stripe orientation, plus noise), written
one file at a time."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _image(rng: np.random.Generator, cls: int, n_classes: int, h: int, w: int) -> np.ndarray:
    """uint8 (h, w, 3): a class colour, stripes at a class angle, noise."""
    hue = cls / max(n_classes, 1)
    base = np.array([np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)]) * 0.35 + 0.5  # (3,)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = np.pi * cls / max(n_classes, 1)
    stripes = 0.5 + 0.5 * np.sin((np.cos(ang) * xx + np.sin(ang) * yy) * (2 * np.pi / max(4.0, min(h, w) / 3)))
    img = base[None, None, :] * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 0.06, (h, w, 3))
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

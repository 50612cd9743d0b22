"""Pictures a method draws after training (``Method.pictures`` / ``render_pictures``: the
colouriser's outputs beside their inputs), written as PNG under ``reports/`` by the pretraining stage.

A method skipped on this data still writes its files, as a picture of the reason, so the stage's
declared outputs exist whatever the dataset (DVC fails a stage whose output is missing)."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.models.features import normalize
from selfsup.core.io import atomic_path
from selfsup.data.loader import eval_batches


def message_picture(text: str, width: int = 640) -> np.ndarray:
    """uint8 (H, width, 3): ``text`` in black on white (PIL's default font)."""
    from PIL import Image, ImageDraw

    lines = textwrap.wrap(text, width=width // 7)
    img = Image.new("RGB", (width, 16 * len(lines) + 16), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((8, 8 + 16 * i), line, fill="black")
    return np.asarray(img)


def save_png(path: str | Path, image: np.ndarray, scale: int = 1) -> None:
    """uint8 (H, W, 3) -> a PNG at ``path`` (atomically), each pixel ``scale`` x ``scale``."""
    from PIL import Image

    img = Image.fromarray(image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def method_pictures(method: Any, data: Any, device: torch.device, n: int, resize: int = 256,
                    crop: int = 224) -> dict[str, np.ndarray]:
    """The method's ``pictures`` drawn from ``n`` test images spread over the split (eval geometry), or, if the
    method was skipped on this data, each as a picture of the reason."""
    if not method.pictures:
        return {}
    if method.skipped:
        return {name: message_picture(method.skipped) for name in method.pictures}
    # spread over the test split (image folders list it class by class)
    idx = np.unique(np.linspace(0, len(data.test) - 1, n).round().astype(np.int64))
    x = next(eval_batches(data.test, len(idx), workers=0, resize=resize, crop=crop, indices=idx))  # uint8 (n, C, S, S)
    out = method.render_pictures(normalize(x.to(device), data.meta["mean"], data.meta["std"]))
    missing = set(method.pictures) - set(out)
    if missing:
        raise RuntimeError(f"{method.name}: render_pictures drew no {', '.join(sorted(missing))}")
    return out

"""Train and eval transforms on uint8 CHW tensors (torchvision.transforms.v2).

Eval: scale to [0, 1] and normalise with the training set's channel mean/std.
Train presets (DeepCluster's official code: RandomResizedCrop(224) + horizontal
flip; ``crop_scale`` is torchvision's ``scale`` argument, default (0.08, 1)):

- ``none``: eval transform (supervised / debugging)
- ``crop``: random resized crop back to the native size (digits: no flip, a
  mirrored digit is another glyph)
- ``crop_flip``: crop + horizontal flip (natural images)

then, when a method's config turns them on (``jitter``, ``grayscale_p``,
``blur_p``; see ``TrainCfg``), the instance-discrimination colour pipeline in the
order of the official MoCo v2 / SimCLR code: colour jitter (with ``jitter_p``),
random grayscale, Gaussian blur.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torchvision.transforms import v2


def eval_transform(meta: dict[str, Any]) -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(meta["mean"], meta["std"])])


def _blur_kernel(size: Sequence[int]) -> int:
    k = max(3, int(0.1 * min(size)))  # SimCLR: 10% of the image side, odd
    return k if k % 2 == 1 else k + 1


def train_transform(meta: dict[str, Any], augment: str, crop_scale: Sequence[float],
                    jitter: Sequence[float] = (0.0, 0.0, 0.0, 0.0), jitter_p: float = 0.8,
                    grayscale_p: float = 0.0, blur_p: float = 0.0) -> v2.Compose:
    size = list(meta["image_size"])
    ops: list[Any] = []
    if augment in ("crop", "crop_flip"):
        ops.append(v2.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True))
    if augment == "crop_flip":
        ops.append(v2.RandomHorizontalFlip())
    elif augment not in ("none", "crop"):
        raise ValueError(f"augment: unknown preset {augment!r}")
    rgb = meta["channels"] == 3
    b, c, s, h = jitter
    if not rgb:  # saturation and hue are undefined on one channel
        s, h = 0.0, 0.0
    if b or c or s or h:
        ops.append(v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=jitter_p))
    if grayscale_p and rgb:
        ops.append(v2.RandomGrayscale(p=grayscale_p))
    if blur_p:
        ops.append(v2.RandomApply([v2.GaussianBlur(_blur_kernel(size), sigma=(0.1, 2.0))], p=blur_p))
    return v2.Compose([*ops, *eval_transform(meta).transforms])


def method_train_transform(meta: dict[str, Any], c: Any) -> v2.Compose:
    """The train transform a method's config (a ``TrainCfg``) asks for."""
    return train_transform(meta, c.augment, c.crop_scale, c.jitter, c.jitter_p, c.grayscale_p, c.blur_p)

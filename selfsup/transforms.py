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
from torch import nn


class EvalTransform(nn.Module):
    """uint8 (..., C, H, W) -> float32 in [0, 1], normalised per channel.

    The same arithmetic as ``v2.ToDtype(float32, scale=True)`` + ``v2.Normalize``, in
    plain torch so that feature extraction does not import torchvision (~1.5 s per stage).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def eval_transform(meta: dict[str, Any]) -> EvalTransform:
    return EvalTransform(meta["mean"], meta["std"])


def _blur_kernel(size: Sequence[int]) -> int:
    k = max(3, int(0.1 * min(size)))  # SimCLR: 10% of the image side, odd
    return k if k % 2 == 1 else k + 1


def train_transform(meta: dict[str, Any], augment: str, crop_scale: Sequence[float],
                    jitter: Sequence[float] = (0.0, 0.0, 0.0, 0.0), jitter_p: float = 0.8,
                    grayscale_p: float = 0.0, blur_p: float = 0.0) -> Any:
    from torchvision.transforms import v2  # lazy: see EvalTransform

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
    return v2.Compose([*ops, eval_transform(meta)])


def method_train_transform(meta: dict[str, Any], c: Any) -> Any:
    """The train transform a method's config (a ``TrainCfg``) asks for."""
    return train_transform(meta, c.augment, c.crop_scale, c.jitter, c.jitter_p, c.grayscale_p, c.blur_p)

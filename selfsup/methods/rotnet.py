"""RotNet (Gidaris, Singh, Komodakis, "Unsupervised Representation Learning by Predicting Image
Rotations", ICLR 2018): every image of the batch is shown at the four rotations 0, 90, 180 and 270
degrees, in the same batch (sec. 3, "we found it better to feed all four rotated copies
simultaneously"), and a 4-way classifier on the features predicts which rotation it sees.

- Rotations are exact (``torch.rot90`` on square views: no interpolation), applied after the
  method's augmentation, so the four copies differ by the rotation only; label k = k x 90 degrees
  counter-clockwise.
- The classifier is a linear layer on the backbone features (the official CIFAR model ends its NIN
  blocks in global pooling + a linear layer; ImageNet: AlexNet's fc layers then a 4-way output).
- Official CIFAR-10 settings (gidariss/FeatureLearningRotNet@8539de6
  ``config/CIFAR10_RotNet_NIN4blocks.py``): batch 128 images (x4 rotations), SGD lr 0.1, momentum 0.9,
  nesterov, weight decay 5e-4, 200 epochs with lr x0.2 / x0.04 / x0.008 from epochs 60, 120 and 160
  (``LUT_lr``), ``dataloader.py``'s RandomCrop(32, padding=4) + flip (``pad_crop``). The network is the
  4-block NIN without the average pool after block 3 (net_opt ``use_avg_on_conv3`` False):
  ``model.backbone: nin_rotnet`` (``selfsup.models.backbones.NIN``; preset rotnet_cifar10).
- Official ImageNet settings (``config/ImageNet_RotNet_AlexNet.py``): batch 192, 50 epochs, lr 0.01 x0.1
  from epochs 15, 30 and 45, RandomSizedCrop(224) + flip, RotNet's AlexNet (``architectures/AlexNet.py``:
  ``model.backbone: alexnet_rotnet``; preset rotnet_imagenet).
- The history logs ``pretext_acc``: the rotation accuracy on the training batches, which the report
  shows beside the evaluation numbers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selfsup.core.config import ConfigError, non_negative, one_of
from selfsup.engine.config import TrainCfg
from selfsup.models.heads import HEADS, projection_head
from selfsup.methods import register
from selfsup.augment.batched import ViewSpec
from selfsup.engine.contract import Batch, Method, StepOut, view_spec

ROTATIONS = 4


def rotate_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, S, S) -> the four rotations stacked (4B, C, S, S), rotation-major, and their labels
    (4B,): rows k*B .. (k+1)*B - 1 are the batch turned k x 90 degrees counter-clockwise."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotnet: views must be square to rotate exactly, got {tuple(x.shape[-2:])}")
    xs = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(ROTATIONS)])  # (4B, C, S, S)
    y = torch.arange(ROTATIONS, device=x.device).repeat_interleave(len(x))  # (4B,)
    return xs, y


def pad_crop(x: torch.Tensor, pad: int, fill: torch.Tensor) -> torch.Tensor:
    """torchvision's RandomCrop(S, padding=pad) per image on a batch (B, C, S, S) -> (B, C, S, S): the
    image padded by ``pad`` on every side with ``fill`` (C,) (the normalised value of a 0 pixel:
    RandomCrop's constant fill 0 on the unnormalised image), then an S x S window at an offset drawn
    uniformly in [0, 2 pad] per axis and image (from the global RNG, which the loop seeds per step)."""
    b, c, h, w = x.shape
    big = fill.to(x.dtype).view(1, c, 1, 1).expand(b, c, h + 2 * pad, w + 2 * pad).clone()
    big[:, :, pad:pad + h, pad:pad + w] = x  # (B, C, S + 2 pad, S + 2 pad)
    off = torch.randint(0, 2 * pad + 1, (b, 2), device=x.device)  # (B, 2): top, left
    ys = off[:, :1] + torch.arange(h, device=x.device)  # (B, S) rows of each window
    xs = off[:, 1:] + torch.arange(w, device=x.device)  # (B, S) columns
    rows = torch.take_along_dim(big, ys[:, None, :, None].expand(-1, c, -1, w + 2 * pad), dim=2)  # (B, C, S, S+2p)
    return torch.take_along_dim(rows, xs[:, None, None, :].expand(-1, c, h, -1), dim=3)  # (B, C, S, S)


@dataclass
class RotNetCfg(TrainCfg):
    # the rotation classifier on the features: linear, or mlp (Linear -> BN -> ReLU -> Linear, the
    # evaluated features one block below the classifier, as the paper's NIN evaluates block 2 of 4)
    head: str = "linear"
    # > 0: the view is a random S x S crop of the image zero-padded by this many pixels (torchvision's
    # RandomCrop(32, padding=4) of the official CIFAR loader, gidariss/FeatureLearningRotNet@8539de6
    # dataloader.py), with a flip under augment crop_flip, instead of a random resized crop of
    # crop_scale; 0: the random resized crop (the official ImageNet loader's RandomSizedCrop(224))
    pad_crop: int = 0

    def check(self, p: str) -> None:
        super().check(p)
        one_of(p, "head", self.head, HEADS)
        non_negative(p, self, "pad_crop")
        if self.pad_crop and self.augment == "none":
            raise ConfigError(f"{p}.pad_crop: a padded crop needs augment crop or crop_flip, got none")


@register
class RotNet(Method):
    name = "rotnet"
    Config = RotNetCfg

    def __init__(self, backbone: Any, cfg: RotNetCfg, num_classes: int):
        super().__init__(backbone, cfg, num_classes)
        act = [nn.ReLU()] if backbone.relu_head else []
        self.head = nn.Sequential(*act, projection_head(cfg.head, backbone.out_dim, ROTATIONS, bn=True))
        # the normalised value of a 0 pixel per channel (pad_crop's fill); set from the data's statistics
        self.register_buffer("pad_fill", torch.zeros(backbone.in_channels), persistent=False)

    @classmethod
    def from_data(cls, backbone: Any, cfg: RotNetCfg, data: Any) -> "RotNet":
        m = cls(backbone, cfg, data.num_classes)
        mean, std = (torch.tensor(data.meta[k], dtype=torch.float32) for k in ("mean", "std"))
        m.pad_fill.copy_(-mean / std)  # (C,): (0 - mean) / std
        return m

    def view_specs(self) -> list[ViewSpec]:
        spec = view_spec(self.cfg)
        if self.cfg.pad_crop:  # the padded crop is taken in forward: the view keeps the image's size
            spec = dataclasses.replace(spec, crop=False)
        return [spec]

    def forward(self, batch: Batch) -> StepOut:
        x = batch.x  # (B, C, S, S)
        if self.cfg.pad_crop:
            x = pad_crop(x, self.cfg.pad_crop, self.pad_fill)  # (B, C, S, S)
        xs, y = rotate_batch(x)  # (4B, C, S, S), (4B,)
        logits = self.head(self.backbone(xs)).float()  # (4B, 4)
        loss = nn.functional.cross_entropy(logits, y)
        return StepOut(loss, {"pretext_acc": (logits.argmax(1) == y).float().mean().detach()})

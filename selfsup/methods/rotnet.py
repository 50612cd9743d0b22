"""RotNet (Gidaris, Singh, Komodakis, "Unsupervised Representation Learning by Predicting Image
Rotations", ICLR 2018): every image of the batch is shown at the four rotations 0, 90, 180 and 270
degrees, in the same batch (sec. 3, "we found it better to feed all four rotated copies
simultaneously"), and a 4-way classifier on the features predicts which rotation it sees.

- Rotations are exact (``torch.rot90`` on square views: no interpolation), applied after the
  method's augmentation, so the four copies differ by the rotation only; label k = k x 90 degrees
  counter-clockwise.
- The classifier is a linear layer on the backbone features (the official CIFAR model ends its NIN
  blocks in global pooling + a linear layer; ImageNet: AlexNet's fc layers then a 4-way output).
- Official CIFAR-10 settings (FeatureLearningRotNet, ``config/CIFAR10_RotNet_NIN4blocks.py``):
  batch 128 images (x4 rotations), SGD lr 0.1, momentum 0.9, nesterov, weight decay 5e-4,
  100 epochs with lr x0.2 at epochs 30, 60 and 80, random crop (pad 4) + flip. The paper's CIFAR
  network is the 4-block NIN, ``model.backbone: nin`` (``selfsup.models.NIN``; preset rotnet_cifar10).
- The history logs ``pretext_acc``: the rotation accuracy on the training batches, which the report
  shows beside the evaluation numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selfsup.config import TrainCfg, one_of
from selfsup.heads import HEADS, projection_head
from selfsup.methods import register
from selfsup.methods.base import Batch, Method, StepOut

ROTATIONS = 4


def rotate_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, S, S) -> the four rotations stacked (4B, C, S, S), rotation-major, and their labels
    (4B,): rows k*B .. (k+1)*B - 1 are the batch turned k x 90 degrees counter-clockwise."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotnet: views must be square to rotate exactly, got {tuple(x.shape[-2:])}")
    xs = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(ROTATIONS)])  # (4B, C, S, S)
    y = torch.arange(ROTATIONS, device=x.device).repeat_interleave(len(x))  # (4B,)
    return xs, y


@dataclass
class RotNetCfg(TrainCfg):
    # the rotation classifier on the features: linear, or mlp (Linear -> BN -> ReLU -> Linear, the
    # evaluated features one block below the classifier, as the paper's NIN evaluates block 2 of 4)
    head: str = "linear"

    def check(self, p: str) -> None:
        super().check(p)
        one_of(p, "head", self.head, HEADS)


@register
class RotNet(Method):
    name = "rotnet"
    Config = RotNetCfg

    def __init__(self, backbone: Any, cfg: RotNetCfg, num_classes: int):
        super().__init__(backbone, cfg, num_classes)
        act = [nn.ReLU()] if backbone.relu_head else []
        self.head = nn.Sequential(*act, projection_head(cfg.head, backbone.out_dim, ROTATIONS, bn=True))

    def forward(self, batch: Batch) -> StepOut:
        xs, y = rotate_batch(batch.x)  # (4B, C, S, S), (4B,)
        logits = self.head(self.backbone(xs)).float()  # (4B, 4)
        loss = nn.functional.cross_entropy(logits, y)
        return StepOut(loss, {"pretext_acc": (logits.argmax(1) == y).float().mean().detach()})

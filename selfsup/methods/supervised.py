"""Supervised baseline: a linear classifier on the backbone, cross-entropy on the true labels,
trained by the same loop and augmentations as the self-supervised methods."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from selfsup.engine.config import TrainCfg
from selfsup.methods import register
from selfsup.engine.contract import Batch, Method, StepOut


@dataclass
class SupervisedCfg(TrainCfg):
    pass


@register
class Supervised(Method):
    name = "supervised"
    Config = SupervisedCfg
    needs_labels = True

    def __init__(self, backbone: Any, cfg: SupervisedCfg, num_classes: int):
        super().__init__(backbone, cfg, num_classes)
        act = [nn.ReLU(inplace=True)] if backbone.relu_head else []
        self.head = nn.Sequential(*act, nn.Linear(backbone.out_dim, num_classes))

    def forward(self, batch: Batch) -> StepOut:
        logits = self.head(self.backbone(batch.x)).float()  # (B, classes)
        loss = nn.functional.cross_entropy(logits, batch.y, ignore_index=-1)
        acc = (logits.argmax(1) == batch.y).float().mean()
        return StepOut(loss, {"train_acc": acc.detach()})

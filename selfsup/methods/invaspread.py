"""InvaSpread: unsupervised embedding learning via invariant and spreading instance
features (Ye, Zhang, Yuen, Chang; CVPR 2019), as the paper and the official code
(mangye16/Unsupervised_Embedding_Learning, ``demo_seen.py`` + ``BatchCriterion``) do it.

- Two augmented views of each image in a batch, one forward pass over the 2B images
  (official: ``torch.cat((inputs1, inputs2), 0)``), a linear embedding (the
  ResNet's fc to ``low_dim`` 128), L2-normalised; no memory bank.
- The loss (``selfsup.losses.contrastive.invaspread_loss``), temperature 0.1: ``loss_form:
  code`` (default) is the official ``BatchCriterion`` over the 2B views in both
  directions (-log P(positive) - sum over the 2B-2 other in-batch negatives of
  log(1 - P), the softmax over the 2B-1 other views), with the official one-sided
  gradient (``detach``); ``paper`` is Eq. 5 with view 1 as the "original".
- Official CIFAR script: ResNet-18, batch 128 (drop_last), 301 epochs, lr 0.03 x0.1 from
  epoch 120, x0.05 from 160, x0.01 from 200 (absolute factors), momentum 0.9, weight decay 5e-4, RandomResizedCrop scale (0.2, 1),
  ColorJitter(0.4, 0.4, 0.4, 0.4) always applied, RandomGrayscale 0.2, flip; kNN with
  k 200 and sigma = the training temperature.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from selfsup.core import dist
from selfsup.core.config import one_of, positive
from selfsup.engine.config import TrainCfg
from selfsup.losses.contrastive import invaspread_loss
from selfsup.models.heads import EvalHead, HEADS, l2n, projection_head, proj_spec
from selfsup.methods import register
from selfsup.engine.contract import Batch, Method, StepOut


@dataclass
class InvaSpreadCfg(TrainCfg):
    # official CIFAR defaults (demo_seen.py)
    batch_size: int = 128
    lr: float = 0.03
    weight_decay: float = 5e-4
    augment: str = "crop_flip"
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    # official adjust_learning_rate (after its "fix lr bug" commit): absolute factors of the base lr
    lr_schedule: str = "step"
    lr_steps: list[int] = field(default_factory=lambda: [120, 160, 200])
    lr_factors: list[float] = field(default_factory=lambda: [0.1, 0.05, 0.01])
    drop_last: bool = True  # official loader (its BatchCriterion needs full batches)
    epochs: int = 301  # the official loop: range(start_epoch, start_epoch + 301)
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.4])
    jitter_p: float = 1.0  # official: ColorJitter without RandomApply
    grayscale_p: float = 0.2
    temperature: float = 0.1  # official --batch-t
    dim: int = 128  # official --low-dim
    head: str = "linear"  # official: the ResNet's fc to low_dim
    loss_form: str = "code"  # code (BatchCriterion, 2B views both ways) | paper (Eq. 5)
    detach: bool = True  # code form: the official one-sided gradient (x . x.t().data)

    def check(self, p: str) -> None:
        super().check(p)
        positive(p, self, "temperature", "dim")
        one_of(p, "head", self.head, HEADS)
        one_of(p, "loss_form", self.loss_form, ("code", "paper"))


@register
class InvaSpread(Method):
    name = "invaspread"
    Config = InvaSpreadCfg
    views = 2

    def __init__(self, backbone: Any, cfg: InvaSpreadCfg, num_classes: int):
        super().__init__(backbone, cfg, num_classes)
        self.head = projection_head(cfg.head, backbone.out_dim, cfg.dim)

    def eval_head(self) -> EvalHead:
        # the official kNN (utils.kNN) runs on the L2-normalised low_dim output
        c = self.cfg
        return EvalHead({"proj": proj_spec(c.head, self.backbone.out_dim, c.dim), "l2": True}, self.head)

    def forward(self, batch: Batch) -> StepOut:
        x1, x2 = batch.views  # (B, C, H, W) each
        b = len(x1)
        z = l2n(self.head(self.backbone(torch.cat([x1, x2]))).float())  # (2B, dim), one pass as the official code
        z1, z2 = z[:b], z[b:]
        # several processes: the code form's candidates are the views of all ranks (the paper form stays per rank)
        loss = invaspread_loss(z1, z2, self.cfg.temperature, self.cfg.loss_form, self.cfg.detach,
                               gather=dist.world() > 1)
        with torch.no_grad():
            pos_sim = (z1 * z2).sum(1).mean()
        return StepOut(loss, {"pos_sim": pos_sim})

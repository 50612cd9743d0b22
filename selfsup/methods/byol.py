"""BYOL (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020): an online network (encoder,
projector, predictor) regresses the projection a slowly moving target network (encoder, projector)
gives of another view of the same image; no negatives (sec. 3).

- Heads (sec. 3.3): projector and predictor are the same MLP shape, Linear(4096) -> BN -> ReLU ->
  Linear(256) (``proj_hidden`` / ``proj_dim``, ``pred_hidden``). ``head_bias`` first (official
  deepmind-research ``byol/utils/networks.py`` ``MLP``: ``hk.Linear(with_bias=True)`` -> BN -> ReLU ->
  ``hk.Linear(with_bias=False)``): the first Linear has a bias, the last none; ``last``: the shared
  ``selfsup.models.heads.projection_head`` layout, the bias on the last Linear and none before the BN. The
  BN cancels the first bias in the forward pass; the last one is a trained offset of the output the
  loss compares, which the official heads do not have.
- Loss (eq. 2): 2 - 2 cos(q_online(v), sg(z_target(v'))) for both orders of the two views, summed
  (the symmetrised loss, eq. 4); ``selfsup.losses.contrastive.byol_loss``.
- Target (sec. 3.1): an exponential moving average of the online encoder and projector, updated
  after each optimiser step with decay tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 over the
  K optimiser steps of the run (tau_base 0.996; ``selfsup.models.momentum.cosine_momentum``); it gets no
  gradient. The step counter is a buffer, so a resumed run continues the schedule exactly.
- Augmentations (Table 6): two asymmetric views, both with crop, flip, colour jitter (0.4, 0.4, 0.2,
  0.1, p 0.8) and grayscale 0.2; view 1 blur p 1.0, no solarisation; view 2 blur p 0.1, solarise
  p 0.2 (``blur_p`` / ``solarize_p`` for view 1, ``blur_p2`` / ``solarize_p2`` for view 2).
- The saved encoder is the online one (sec. 3.1: "at the end of training we only keep the encoder").
- Official ImageNet: ResNet-50, batch 4096, LARS (base lr 0.2 x batch / 256, weight decay 1.5e-6,
  biases and BN excluded), 10 warm-up epochs then cosine, 1000 epochs (300 in the ablations).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from selfsup.augment.batched import ViewSpec
from selfsup.core.config import ConfigError, one_of, positive
from selfsup.engine.config import TrainCfg
from selfsup.losses.contrastive import byol_loss
from selfsup.models.heads import projection_head
from selfsup.methods import register
from selfsup.engine.contract import Batch, EpochPlan, Method, StepOut, TrainContext, view_spec
from selfsup.models.momentum import MomentumTarget


# head_bias -> projection_head's (hidden_bias, out_bias)
HEAD_BIAS = {"first": (True, False), "last": (None, True)}


@dataclass
class BYOLCfg(TrainCfg):
    augment: str = "crop_flip"
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 1.0  # view 1 (Table 6)
    solarize_p: float = 0.0
    blur_p2: float = 0.1  # view 2
    solarize_p2: float = 0.2
    proj_dim: int = 256
    proj_hidden: int = 4096
    pred_hidden: int = 4096
    tau: float = 0.996  # tau_base
    tau_schedule: str = "cosine"  # cosine (paper) | constant
    head_bias: str = "first"  # first (official MLP: bias on the first Linear only) | last

    def check(self, p: str) -> None:
        super().check(p)
        positive(p, self, "proj_dim", "proj_hidden", "pred_hidden")
        one_of(p, "tau_schedule", self.tau_schedule, ("cosine", "constant"))
        one_of(p, "head_bias", self.head_bias, HEAD_BIAS)
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"{p}.tau: a decay in [0, 1], got {self.tau}")
        for k in ("blur_p2", "solarize_p2"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ConfigError(f"{p}.{k}: a probability in [0, 1], got {getattr(self, k)}")


@register
class BYOL(Method):
    name = "byol"
    Config = BYOLCfg

    def __init__(self, backbone: Any, cfg: BYOLCfg, num_classes: int):
        super().__init__(backbone, cfg, num_classes)
        hidden_bias, out_bias = HEAD_BIAS[cfg.head_bias]
        self.projector = projection_head("mlp", backbone.out_dim, cfg.proj_dim, cfg.proj_hidden, bn=True,
                                         hidden_bias=hidden_bias, out_bias=out_bias)
        self.predictor = projection_head("mlp", cfg.proj_dim, cfg.proj_dim, cfg.pred_hidden, bn=True,
                                         hidden_bias=hidden_bias, out_bias=out_bias)
        # the target starts as a copy of the online encoder and projector, never optimised; tau on the
        # cosine over the run's K optimiser steps (set from the loop's context)
        self.target = MomentumTarget({"backbone": self.backbone, "projector": self.projector}, cfg.tau,
                                     cfg.tau_schedule)

    @property
    def target_backbone(self) -> nn.Module:
        return self.target["backbone"]

    @property
    def target_projector(self) -> nn.Module:
        return self.target["projector"]

    def view_specs(self) -> list[ViewSpec]:
        c = self.cfg
        first = view_spec(c)
        return [first, dataclasses.replace(first, blur_p=c.blur_p2, solarize_p=c.solarize_p2)]

    def on_epoch_start(self, epoch: int, ctx: TrainContext) -> EpochPlan:
        self.target.total_steps = ctx.total_steps
        return EpochPlan()

    def on_resume(self, ctx: TrainContext) -> None:
        self.target.total_steps = ctx.total_steps

    def tau(self) -> float:
        return self.target.momentum()

    def forward(self, batch: Batch) -> StepOut:
        x1, x2 = batch.views  # (B, C, H, W) each
        q1 = self.predictor(self.projector(self.backbone(x1))).float()  # (B, proj_dim)
        q2 = self.predictor(self.projector(self.backbone(x2))).float()
        with torch.no_grad():
            z1 = self.target_projector(self.target_backbone(x1)).float()  # (B, proj_dim)
            z2 = self.target_projector(self.target_backbone(x2)).float()
        loss = byol_loss(q1, z2) + byol_loss(q2, z1)
        return StepOut(loss, {"tau": torch.tensor(self.tau(), device=loss.device)})

    @torch.no_grad()
    def on_after_step(self, stepped: bool) -> None:
        if stepped:  # the online network changed: the target follows with this step's decay
            self.target.update()

"""MoCo v3 (Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV
2021), as the paper (sec. 3, Algorithm 1, sec. 4.2) and the official code (facebookresearch/moco-v3
``moco/builder.py``, ``main_moco.py``, ``vits.py``, CONFIG.md) do it.

- Base encoder f_q = backbone + projector + predictor; momentum encoder f_k = a copy of backbone +
  projector, never optimised, following f_q by theta_k <- m theta_k + (1 - m) theta_q with m on a cosine
  from ``m`` (0.99) to 1 over the run's optimiser steps (``--moco-m-cos``; ``selfsup.models.momentum``). The
  official ``forward`` applies the update for iteration i with m(i) before computing that iteration's
  keys; here it runs right after optimiser step i - 1 with the same m(i) (``target.step`` + 1), which is the
  same sequence (the official update at i = 0 is a no-op: f_k starts as a copy of f_q).
- Heads (official ``_build_mlp``; ``selfsup.models.heads.mlp``): Linear layers without bias, BN + ReLU after
  each hidden one. Projector: 3 layers for a ViT, 2 for a ResNet (``proj_layers`` 0: by the backbone),
  ``mlp_dim`` 4096 -> ``dim`` 256, ending in a BN without affine parameters; predictor: 2 layers
  ``dim -> mlp_dim -> dim``, ending in that BN for a ViT and in a plain Linear for a ResNet
  (``pred_last_bn``: auto | bn | none).
- Loss (Algorithm 1): ctr(q1, k2) + ctr(q2, k1), ctr(q, k) = cross-entropy of the logits
  q k_all^T / tau (q, k L2-normalised; k_all the keys of every rank in rank order, no gradient;
  the positive of this rank's sample n is column rank x B + n), scaled by 2 tau as the official code
  (``mocov3_loss``). No queue: the other images of the global batch are the negatives. tau
  ``temperature``: 0.2 for ViTs, 1.0 for ResNets (official defaults).
- Random patch projection (sec. 4.2): with a ViT and ``freeze_patch_embed`` the patch projection stays
  at its random init (``--stop-grad-conv1``), which the paper shows stabilises training.
- Augmentation (BYOL's, official ``augmentation1`` / ``augmentation2``): crop (``crop_scale``), flip,
  jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2; view 1 blur p 1.0; view 2 blur p 0.1 + solarise 0.2.
- ViT position embedding and init (official ``vits.py`` ``VisionTransformerMoCo``; ViT only, a conv net
  has neither and ignores them): ``pos_embed`` sincos, the fixed 2-D sin-cos table
  (``build_2d_sincos_position_embedding``, temperature 10000, CLS row 0, ``requires_grad`` False: not
  trained, not decayed; ``ViT.fix_sincos_pos_embed``) | learned (torchvision's); ``init`` official
  (xavier-uniform Linear layers with q, k, v drawn as three matrices, xavier-uniform patch projection, CLS
  token N(0, 1e-6); ``ViT.init_mocov3``) | torchvision. Both are applied before the momentum encoder is
  copied, so it starts identical (official: copied from the base encoder).
- The saved encoder is the base encoder's backbone (the official ``convert_to_deit`` / ``main_lincls``
  keep ``base_encoder`` without its head).

Official ImageNet: ViT-B/16 (and ViT-S), batch 4096, AdamW lr 1.5e-4 x batch/256, weight decay 0.1 on
every parameter, 40 warm-up epochs then cosine, 300 epochs, tau 0.2, m 0.99 -> 1, crop scale
[0.08, 1]. ResNet-50: LARS lr 0.6 x batch/256 (0.3 for 300 / 1000 epochs), weight decay 1e-6 (1.5e-6 and
m 0.996 for 1000 epochs; LARS skips biases and BN), 10 warm-up epochs, 100 epochs, tau 1.0, crop scale
[0.2, 1]. SyncBN everywhere (``sync_bn``), fp16 autocast. Differences here: the ViT-S has 6 heads
(official MoCo v3: 12); ResNets have no zero-initialised residual BN (official ``zero_init_residual``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.core import dist
from selfsup.augment.batched import ViewSpec
from selfsup.core.config import ConfigError, non_negative, one_of, positive
from selfsup.engine.config import TrainCfg
from selfsup.models.heads import mlp
from selfsup.methods import register
from selfsup.engine.contract import (
    Batch,
    EpochPlan,
    Method,
    StepOut,
    TrainContext,
    view_spec,
)
from selfsup.models.backbones import require_vit, vit_trunk
from selfsup.models.momentum import MomentumTarget


def mocov3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """The official ``contrastive_loss``: (B, D) queries of this rank against the (W B, D) keys of all
    ranks (``k`` is this rank's (B, D), gathered here without gradient); the positive of query n is
    key rank x B + n; cross-entropy averaged over this rank's queries, times 2 tau."""
    q = F.normalize(q.float(), dim=1)
    k = dist.all_gather(F.normalize(k.detach().float(), dim=1))  # (W B, D)
    logits = q @ k.t() / temperature  # (B, W B)
    labels = torch.arange(len(q), device=q.device) + len(q) * dist.rank()
    return F.cross_entropy(logits, labels) * (2.0 * temperature)


@dataclass
class MoCoV3Cfg(TrainCfg):
    # official ViT-B/16 (CONFIG.md; batch 4096 over 64 GPUs)
    epochs: int = 300
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1.5e-4
    lr_scaling: str = "linear"  # lr x batch / 256
    lr_schedule: str = "cosine"
    warmup_epochs: float = 40.0
    weight_decay: float = 0.1  # every parameter (official AdamW over model.parameters())
    augment: str = "crop_flip"
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # ResNet-50 runs: [0.2, 1]
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 1.0  # view 1
    solarize_p: float = 0.0
    blur_p2: float = 0.1  # view 2
    solarize_p2: float = 0.2
    dim: int = 256
    mlp_dim: int = 4096
    proj_layers: int = 0  # 0: 3 for a ViT, 2 for a ResNet (official)
    pred_last_bn: str = "auto"  # auto (official: a BN for a ViT, none for a ResNet) | bn | none
    m: float = 0.99
    m_schedule: str = "cosine"  # cosine (--moco-m-cos) | constant
    temperature: float = 0.2  # ViT (ResNet: 1.0)
    freeze_patch_embed: bool = True  # ViT only: random patch projection (--stop-grad-conv1)
    pos_embed: str = "sincos"  # ViT only: sincos (official fixed 2-D sin-cos, not trained) | learned
    init: str = "official"  # ViT only: official (vits.py: xavier, q/k/v apart, CLS N(0, 1e-6)) | torchvision

    def check(self, p: str) -> None:
        super().check(p)
        positive(p, self, "dim", "mlp_dim", "temperature")
        non_negative(p, self, "proj_layers")
        if self.proj_layers == 1:
            raise ConfigError(f"{p}.proj_layers: at least 2 (0: by the backbone), got 1")
        one_of(p, "pred_last_bn", self.pred_last_bn, ("auto", "bn", "none"))
        one_of(p, "m_schedule", self.m_schedule, ("cosine", "constant"))
        one_of(p, "pos_embed", self.pos_embed, ("sincos", "learned"))
        one_of(p, "init", self.init, ("official", "torchvision"))
        if not 0.0 <= self.m <= 1.0:
            raise ConfigError(f"{p}.m: a momentum in [0, 1], got {self.m}")
        for k in ("blur_p2", "solarize_p2"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ConfigError(f"{p}.{k}: a probability in [0, 1], got {getattr(self, k)}")


@register
class MoCoV3(Method):
    name = "mocov3"
    Config = MoCoV3Cfg

    def __init__(self, backbone: Any, cfg: MoCoV3Cfg, num_classes: int):
        super().__init__(backbone, cfg, num_classes)
        c = cfg
        vit = vit_trunk(backbone)
        if vit is not None:  # before the momentum copy below: both encoders start the same
            if c.init == "official":
                vit.init_mocov3()
            if c.pos_embed == "sincos":  # after the init, which leaves the position embedding alone
                vit.fix_sincos_pos_embed("h")
        if c.freeze_patch_embed:
            require_vit(backbone, "mocov3.freeze_patch_embed", "the random patch projection (sec. 4.2) is a ViT's "
                        "(set it to false for a conv net)").freeze_patch_embed()
        layers = c.proj_layers or (3 if vit is not None else 2)
        pred_bn = c.pred_last_bn == "bn" or (c.pred_last_bn == "auto" and vit is not None)
        self.projector = mlp([backbone.out_dim] + [c.mlp_dim] * (layers - 1) + [c.dim], last_bn="no_affine")
        self.predictor = mlp([c.dim, c.mlp_dim, c.dim], last_bn="no_affine" if pred_bn else "none")
        # the momentum encoder: a copy of backbone + projector (official: same init), never optimised; the
        # update after optimiser step i uses the official m(i + 1) of the next iteration (offset 1)
        self.target = MomentumTarget({"backbone": self.backbone, "projector": self.projector}, c.m,
                                     c.m_schedule, offset=1)

    @property
    def momentum_backbone(self) -> nn.Module:
        return self.target["backbone"]

    @property
    def momentum_projector(self) -> nn.Module:
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

    def momentum(self) -> float:
        """m for the update after this optimiser step: the official m(i) of the next iteration i."""
        return self.target.momentum()

    def forward(self, batch: Batch) -> StepOut:
        c = self.cfg
        x1, x2 = batch.views  # (B, C, H, W) each
        q1 = self.predictor(self.projector(self.backbone(x1)))  # (B, dim); views apart, as the official code
        q2 = self.predictor(self.projector(self.backbone(x2)))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(x1))
            k2 = self.momentum_projector(self.momentum_backbone(x2))
        loss = mocov3_loss(q1, k2, c.temperature) + mocov3_loss(q2, k1, c.temperature)
        with torch.no_grad():
            pos = (F.normalize(q1.float(), dim=1) * F.normalize(k2.float(), dim=1)).sum(1).mean()
        return StepOut(loss, {"pos_sim": pos, "momentum": torch.tensor(self.momentum(), device=loss.device)})

    @torch.no_grad()
    def on_after_step(self, stepped: bool) -> None:
        if stepped:  # the base encoder changed: the momentum encoder follows
            self.target.update()

    def encoder(self) -> nn.Module:
        return self.backbone

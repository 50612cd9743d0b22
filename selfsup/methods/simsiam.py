"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021): two views
through one encoder and projector, a predictor on one side, and a stop-gradient on the other;
no negatives, no momentum encoder (sec. 3, Algorithm 1).

- Loss (eq. 1-4): D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2 with D the negative cosine similarity
  (``selfsup.losses.contrastive.simsiam_loss``); its minimum is -1.
- Projector (sec. 4, "Baseline settings"): ``proj_layers`` x (Linear -> BN), ReLU between, the
  output BN included (official ``simsiam/builder.py``: the last BN has no affine parameters); 3
  layers of 2048 on ImageNet, 2 on CIFAR (sec. 5, the CIFAR ResNet variant). Predictor: Linear(512)
  -> BN -> ReLU -> Linear(2048), the bottleneck ``pred_hidden``.
- ``fix_pred_lr`` (official ``--fix-pred-lr``, on in its recipes): the predictor keeps the base lr
  while the rest follows the cosine schedule (sec. 4.2 finds it helps).
- ``zero_init_residual`` (official ``simsiam/builder.py``: ``base_encoder(num_classes=dim,
  zero_init_residual=True)``, the torchvision ResNet ``main_simsiam.py`` passes in): the last BN of
  every residual block starts with weight 0, so each block starts as the identity; done here on the
  built backbone (torchvision ``BasicBlock.bn2`` / ``Bottleneck.bn3``, the blocks of every ResNet
  ``selfsup.models.backbones`` builds, CIFAR stem or not). A backbone without residual blocks (smallcnn,
  alexnet_bn, a ViT) is left as built.
- Official ImageNet: ResNet-50, batch 512, SGD lr 0.05 x batch / 256, momentum 0.9, weight decay
  1e-4, 100 epochs cosine, MoCo v2's augmentations. CIFAR-10 (sec. 5): ResNet-18 variant, batch
  512, lr 0.03 x batch / 256, weight decay 5e-4, 800 epochs.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from selfsup.core.config import ConfigError, positive
from selfsup.engine.config import TrainCfg
from selfsup.losses.contrastive import simsiam_loss
from selfsup.models.heads import mlp
from selfsup.methods import register
from selfsup.engine.contract import Batch, Method, StepOut
from selfsup.engine.optim import param_groups


@dataclass
class SimSiamCfg(TrainCfg):
    augment: str = "crop_flip"
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    dim: int = 2048
    proj_layers: int = 3  # CIFAR: 2
    pred_hidden: int = 512
    fix_pred_lr: bool = True
    zero_init_residual: bool = True  # official: each residual block's last BN weight starts at 0

    def check(self, p: str) -> None:
        super().check(p)
        positive(p, self, "dim", "pred_hidden")
        if self.proj_layers < 1:
            raise ConfigError(f"{p}.proj_layers: at least 1, got {self.proj_layers}")


def zero_init_residual_(net: nn.Module) -> int:
    """Zero the weight of the last BN of every torchvision residual block in ``net`` (what torchvision's
    ``ResNet(zero_init_residual=True)`` does at construction, which the official ``simsiam/builder.py``
    asks for); returns the number of blocks changed (0 for a net without residual blocks)."""
    resnet = sys.modules.get("torchvision.models.resnet")
    if resnet is None:  # torchvision's ResNets never imported: the net cannot hold one of their blocks
        return 0
    n = 0
    for m in net.modules():
        if isinstance(m, resnet.Bottleneck):
            nn.init.zeros_(m.bn3.weight)
            n += 1
        elif isinstance(m, resnet.BasicBlock):
            nn.init.zeros_(m.bn2.weight)
            n += 1
    return n


@register
class SimSiam(Method):
    name = "simsiam"
    Config = SimSiamCfg
    views = 2

    def __init__(self, backbone: Any, cfg: SimSiamCfg, num_classes: int):
        super().__init__(backbone, cfg, num_classes)
        if cfg.zero_init_residual:
            zero_init_residual_(backbone)
        d = backbone.out_dim
        # hidden layers of the backbone's width (official: the encoder's fc width, 2048 on ResNet-50)
        self.projector = mlp([d] * cfg.proj_layers + [cfg.dim], last_bn="no_affine")
        self.predictor = mlp([cfg.dim, cfg.pred_hidden, cfg.dim], last_bn="none")

    def param_groups(self) -> list[dict[str, Any]]:
        c = self.cfg
        pred = set(map(id, self.predictor.parameters()))
        rest = nn.ParameterList([p for p in self.parameters() if id(p) not in pred and p.requires_grad])
        groups = param_groups(rest, c.weight_decay, c.exclude_norm_bias)
        for g in param_groups(self.predictor, c.weight_decay, c.exclude_norm_bias):
            g["fixed_lr"] = c.fix_pred_lr  # the loop keeps the base lr for it
            groups.append(g)
        return groups

    def forward(self, batch: Batch) -> StepOut:
        x1, x2 = batch.views  # (B, C, H, W) each
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))  # (B, dim)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = simsiam_loss(p1.float(), z2.float()) / 2 + simsiam_loss(p2.float(), z1.float()) / 2
        return StepOut(loss, {"z_std": nn.functional.normalize(z1.detach().float(), dim=1).std(0).mean()})

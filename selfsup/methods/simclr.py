"""SimCLR: a simple framework for contrastive learning of visual representations
(Chen, Kornblith, Norouzi, Hinton; ICML 2020), as the paper and the official code
(google-research/simclr) do it, with SGD in place of LARS.

- Two augmented views per image (sec. 3: random resized crop + flip, colour jitter
  with p 0.8 at strength s (CIFAR s = 0.5: [0.4, 0.4, 0.4, 0.1]), grayscale p 0.2,
  Gaussian blur p 0.5 on ImageNet only: the official CIFAR runs set
  ``--use_blur=False``, as we do on small images), one forward pass over all 2B.
- Projection head g(.) (sec. 2.1, B.1): Linear -> BN -> ReLU -> Linear to 128; the
  official code also batch-normalises the output layer (no bias/centre), which
  ``selfsup.models.heads`` does not: noted, not followed. The loss is on the L2-normalised
  head output, evaluation on the backbone features h (before g).
- SimCLR v2 (Chen et al., NeurIPS 2020, sec. 2): a deeper projection head, ``head_layers: 3``
  (official simclr v2 ``num_proj_layers`` 3, each of the backbone's width); the paper fine-tunes from
  the head's first layer: ``finetune.head_layers: {simclr: 1}`` in the preset (the official flag
  ``ft_proj_selector``, 0 by default: the backbone alone); the kNN / linear evaluations read the
  backbone features h as v1.
- NT-Xent (``selfsup.losses.contrastive.nt_xent``) at ``temperature``: the mean over the 2B
  anchors (paper Eq. 1; the official code's value is 2x, see there).
- Official CIFAR-10 settings (README): ResNet-50 (CIFAR stem), batch 512, 1000
  epochs, LARS lr 1.0, weight decay 1e-4, temperature 0.5, 10 warm-up epochs then
  cosine. ImageNet: batch 4096, lr 4.8 (0.3 x B / 256), weight decay 1e-6,
  temperature 0.1, blur on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from selfsup.core import dist
from selfsup.core.config import ConfigError, non_negative, one_of, positive
from selfsup.engine.config import TrainCfg
from selfsup.losses.contrastive import nt_xent
from selfsup.models.heads import EvalHead, HEADS, l2n, projection_head, proj_spec
from selfsup.methods import register
from selfsup.engine.contract import Batch, Method, StepOut


@dataclass
class SimCLRCfg(TrainCfg):
    # official CIFAR-10 defaults (SGD stands in for LARS)
    epochs: int = 1000
    batch_size: int = 512
    lr: float = 1.0
    weight_decay: float = 1e-4
    augment: str = "crop_flip"
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    lr_schedule: str = "cosine"
    warmup_epochs: int = 10
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])  # strength 0.5
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0  # CIFAR: no blur (ImageNet: 0.5)
    temperature: float = 0.5  # CIFAR (ImageNet: 0.1)
    head: str = "mlp"
    head_bn: bool = True  # official: BN in the head
    hidden_dim: int = 0  # 0: the backbone's dimension (official)
    head_layers: int = 2  # the mlp's Linear layers: 2 (v1), 3 (v2)
    dim: int = 128

    def check(self, p: str) -> None:
        super().check(p)
        positive(p, self, "temperature", "dim")
        if self.head_layers < 2:
            raise ConfigError(f"{p}.head_layers: an mlp head has at least 2 layers, got {self.head_layers}")
        if self.head_layers != 2 and self.head != "mlp":
            raise ConfigError(f"{p}.head_layers: {self.head_layers} needs head: mlp, got head: {self.head}")
        non_negative(p, self, "hidden_dim")
        one_of(p, "head", self.head, HEADS)


@register
class SimCLR(Method):
    name = "simclr"
    Config = SimCLRCfg
    views = 2

    def __init__(self, backbone: Any, cfg: SimCLRCfg, num_classes: int):
        super().__init__(backbone, cfg, num_classes)
        self.head = projection_head(cfg.head, backbone.out_dim, cfg.dim, cfg.hidden_dim, bn=cfg.head_bn,
                                    layers=cfg.head_layers)

    def eval_head(self) -> EvalHead:
        # SimCLR evaluates h (before g, sec. 4.2); g's normalised output is offered for comparison
        c = self.cfg
        return EvalHead({"proj": proj_spec(c.head, self.backbone.out_dim, c.dim, c.hidden_dim, c.head_bn,
                                                   c.head_layers),
                         "l2": True}, self.head)

    def forward(self, batch: Batch) -> StepOut:
        x1, x2 = batch.views  # (B, C, H, W) each
        b = len(x1)
        z = l2n(self.head(self.backbone(torch.cat([x1, x2]))).float())  # (2B, dim); BN statistics over all 2B views
        z1, z2 = z[:b], z[b:]
        loss = nt_xent(z1, z2, self.cfg.temperature, gather=dist.world() > 1)
        with torch.no_grad():
            pos_sim = (z1 * z2).sum(1).mean()
        return StepOut(loss, {"pos_sim": pos_sim})

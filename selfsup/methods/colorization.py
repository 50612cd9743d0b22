"""Colourisation (Zhang, Isola, Efros, "Colorful Image Colorization", ECCV 2016): from the
lightness L of a CIE Lab image predict, per pixel, a distribution over quantised ab colours
(sec. 2.1), trained with class rebalancing (sec. 2.2); the encoder is the self-supervised result.
The maths lives in ``selfsup.colour``; this file is the network and the training step.

- Input: the encoder's input adapter (``selfsup.models.LabL``) turns the normalised RGB view into
  L - 50 (the official code's centring); it is saved with the encoder, so extraction, probes and VOC
  transfer hand it RGB like any other backbone.
- Output: the trunk's last feature map (the last ``selfsup.probes.probe_points`` stage: ResNet
  layer4, AlexNet conv5, smallcnn block3) -> 3 x 3 conv (``hidden``) + ReLU -> 1 x 1 conv to the
  Q in-gamut ab bins (``selfsup.colour.ab_bins``, grid ``grid``: the paper's 10 gives its Q = 313
  with the official gamut file). The paper predicts at 1/4 of the input resolution (a VGG-style
  network with dilated conv5-6 and an upsampling conv8); here the targets are the ab channels
  average-pooled to the map's resolution, which is 1/8 on the CIFAR ResNet-18 and 1/2 on
  smallcnn (a documented difference).
- Targets: soft encoding over the ``soft_k`` = 5 nearest bins with a Gaussian of ``soft_sigma`` = 5
  (sec. 2.1). Loss: the multinomial cross-entropy of eq. 2, each pixel weighted by the rebalancing
  weight of its target's most likely bin (eq. 3-4: the empirical ab prior of the training split,
  smoothed by a Gaussian of ``prior_sigma`` = 5, mixed with the uniform by ``rebalance_lambda`` =
  1/2, inverted and normalised to expectation 1). The prior is counted once, before the first
  epoch, over one pass of the training split (the official code ships a prior computed on ImageNet);
  ``rebalance: false`` is the paper's "classification" ablation without rebalancing.
- Pictures (``render_pictures``): test images beside their grayscale input and the colourised
  output, decoded with the annealed mean at ``anneal_t`` = 0.38 (sec. 2.3), written to
  ``reports/colorization.png``.
- A grayscale dataset (the digits default) has no colour to predict: the method is skipped with
  that reason (like ``supervised`` on unlabelled data), its row in the report says so.
- Official ImageNet settings (the ``colorization`` repo's solver): VGG-style network, 224 px,
  batch 40, ADAM lr 3e-5, betas (0.9, 0.99), weight decay 1e-3, ~450k iterations. The history logs
  ``pretext_acc``: how often the most likely bin is the nearest bin of the true colour.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from selfsup import dist
from selfsup.augment import ViewSpec
from selfsup.colour import (ab_bins, annealed_mean, colour_loss, empirical_prior, lab_to_rgb, nearest_bin,
                            rebalance_weights, rgb_to_lab, smooth_prior, soft_encode)
from selfsup.config import ConfigError, TrainCfg, non_negative, positive
from selfsup.methods import register
from selfsup.methods.base import Batch, EpochPlan, Method, StepOut, TrainContext, view_spec
from selfsup.probes import probe_points


@dataclass
class ColorizationCfg(TrainCfg):
    grid: int = 10  # ab bin side (paper: 10)
    soft_k: int = 5  # nearest bins of the soft encoding (paper: 5)
    soft_sigma: float = 5.0  # its Gaussian (paper: 5)
    rebalance: bool = True  # class rebalancing (sec. 2.2); false: the plain classification loss
    rebalance_lambda: float = 0.5  # the uniform's share in the rebalancing mix (paper: 1/2)
    prior_sigma: float = 5.0  # Gaussian smoothing of the empirical prior (paper: 5)
    hidden: int = 0  # the 3 x 3 conv before the bin classifier; 0: the feature map's channels
    anneal_t: float = 0.38  # the annealed-mean temperature for pictures (paper: 0.38)
    view_size: int = 0  # 0: the dataset's
    picture_images: int = 8  # test images in reports/colorization.png

    def check(self, p: str) -> None:
        super().check(p)
        positive(p, self, "grid", "soft_k", "soft_sigma", "prior_sigma", "anneal_t", "picture_images")
        non_negative(p, self, "hidden", "view_size")
        if not 0.0 <= self.rebalance_lambda <= 1.0:
            raise ConfigError(f"{p}.rebalance_lambda: must be in [0, 1], got {self.rebalance_lambda}")


def _map_channels(backbone: Any) -> int:
    """Channels of the trunk's last conv (the feature map the colour head reads)."""
    return int([m for m in backbone.trunk.modules() if isinstance(m, nn.Conv2d)][-1].out_channels)


@register
class Colorization(Method):
    name = "colorization"
    Config = ColorizationCfg
    pictures: ClassVar[tuple[str, ...]] = ("colorization.png",)

    @classmethod
    def input_adapter(cls, cfg: ColorizationCfg, meta: dict[str, Any]) -> dict[str, Any] | None:
        if meta["channels"] != 3:  # grayscale: skipped (skip_reason), the backbone stays as it is
            return None
        return {"kind": "lab_l", "mean": [float(v) for v in meta["mean"]], "std": [float(v) for v in meta["std"]]}

    @classmethod
    def skip_reason(cls, data: Any) -> str:
        c = data.meta["channels"]
        if c != 3:
            return (f"colorization: skipped, the dataset is grayscale ({c} channel{'s' if c > 1 else ''}): there is "
                    "no colour to predict (the backbone stays at its init; a colour dataset such as cifar10 runs it)")
        return ""

    def __init__(self, backbone: Any, cfg: ColorizationCfg, num_classes: int):
        super().__init__(backbone, cfg, num_classes)
        self.register_buffer("centres", ab_bins(cfg.grid))  # (Q, 2)
        q = len(self.centres)
        self.register_buffer("prior", torch.zeros(q, dtype=torch.float64))  # (Q,); all zero: not counted yet
        self.register_buffer("weights", torch.ones(q))  # (Q,) rebalancing weights
        c = _map_channels(backbone)
        h = cfg.hidden or c
        self.head = nn.Sequential(nn.Conv2d(c, h, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(h, q, 1))
        self._map: torch.Tensor | None = None
        self._hook = list(probe_points(backbone).values())[-1].register_forward_hook(self._keep_map)

    def _keep_map(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._map = output

    def view_specs(self) -> list[ViewSpec]:
        return [dataclasses.replace(view_spec(self.cfg), size=self.cfg.view_size)]

    # ------------------------------------------------------------------ colour helpers
    def rgb(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised views -> sRGB in [0, 1] (the adapter's mean / std)."""
        a = self.backbone.adapter
        return (x.float() * a.std + a.mean).clamp(0.0, 1.0)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised views -> (B, Q, h, w) bin logits on the trunk's last map."""
        self.backbone(x)  # the hook keeps the map; the pooled features are not used
        fmap, self._map = self._map, None
        return self.head(fmap).float()

    # ------------------------------------------------------------------ the contract
    def on_epoch_start(self, epoch: int, ctx: TrainContext) -> EpochPlan:
        if self.cfg.rebalance and float(self.prior.sum()) == 0.0:
            self.count_prior(ctx)
        return EpochPlan()

    @torch.no_grad()
    def count_prior(self, ctx: TrainContext) -> None:
        """The empirical ab prior over one pass of the training split (each rank counts its shard;
        the counts are summed), smoothed, and the rebalancing weights from it (eq. 4)."""
        counts = torch.zeros(len(self.centres), dtype=torch.float64, device=self.centres.device)
        for b in ctx.augmented_batches(self.view_specs(), seed=ctx.seed):
            counts += empirical_prior(rgb_to_lab(self.rgb(b.x))[:, 1:], self.centres).to(counts)
        dist.all_reduce(counts)
        self.prior.copy_(smooth_prior(counts, self.centres, self.cfg.prior_sigma))
        self.weights.copy_(rebalance_weights(self.prior, self.cfg.rebalance_lambda).to(self.weights))

    def forward(self, batch: Batch) -> StepOut:
        x = batch.x  # (B, 3, S, S)
        logits = self.logits(x)  # (B, Q, h, w)
        with torch.no_grad():
            ab = rgb_to_lab(self.rgb(x))[:, 1:]  # (B, 2, S, S)
            ab = nn.functional.adaptive_avg_pool2d(ab, logits.shape[-2:])  # (B, 2, h, w)
            target = soft_encode(ab, self.centres, self.cfg.soft_k, self.cfg.soft_sigma)  # (B, Q, h, w)
        loss = colour_loss(logits, target, self.weights)
        acc = (logits.argmax(1) == nearest_bin(ab, self.centres)).float().mean().detach()
        return StepOut(loss, {"pretext_acc": acc})

    @torch.no_grad()
    def colourise(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised views -> (B, 3, S, S) sRGB: their L with the annealed-mean ab
        upsampled (bilinear) from the prediction map (sec. 2.3)."""
        lab = rgb_to_lab(self.rgb(x))  # (B, 3, S, S)
        ab = annealed_mean(self.logits(x), self.centres, self.cfg.anneal_t)  # (B, 2, h, w)
        ab = nn.functional.interpolate(ab, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return lab_to_rgb(torch.cat([lab[:, :1], ab], 1))

    @torch.no_grad()
    def render_pictures(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """(N, 3, S, S) normalised test images -> {"colorization.png": uint8 (3S, N*S, 3)}: rows are the
        originals, their grayscale (L only) inputs and the colourised outputs."""
        was = self.training
        self.eval()
        rgb = self.rgb(images)
        lab = rgb_to_lab(rgb)
        gray = lab_to_rgb(torch.cat([lab[:, :1], torch.zeros_like(lab[:, 1:])], 1))
        rows = [torch.cat(list(r), dim=2) for r in (rgb, gray, self.colourise(images))]  # each (3, S, N*S)
        self.train(was)
        grid = torch.cat(rows, dim=1).permute(1, 2, 0)  # (3S, N*S, 3)
        return {"colorization.png": (grid.clamp(0, 1) * 255).round().byte().cpu().numpy()}

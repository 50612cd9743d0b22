"""Colourisation (Zhang, Isola, Efros, "Colorful Image Colorization", ECCV 2016): from the
lightness L of a CIE Lab image predict, per pixel, a distribution over quantised ab colours
(sec. 2.1), trained with class rebalancing (sec. 2.2); the encoder is the self-supervised result.
The maths lives in ``selfsup.augment.colour``; this file is the network and the training step.

- Input: the encoder's input adapter (``selfsup.models.backbones.LabL``) turns the normalised RGB view into
  L - 50 (the official code's centring); it is saved with the encoder, so extraction, probes and VOC
  transfer hand it RGB like any other backbone.
- Output: the trunk's last feature map (the last ``selfsup.eval.layer_probes.probe_points`` stage: ResNet
  layer4, AlexNet conv5, smallcnn block3) -> 3 x 3 conv (``hidden``) + ReLU -> 1 x 1 conv to the
  Q in-gamut ab bins (``selfsup.augment.colour.ab_bins``, rule ``bins``, grid ``grid``: ``hull`` at 10 is
  the official Q = 313 set).
- Train view (``train_crop``): ``fixed``, as the official AlexNet's data layer
  (``richzhang/colorization@407a471 colorization/train_alexnet/train_val.prototxt``: crop_size 180,
  mirror 1, of the 256 px database images): the image at ``load_size`` px (image files: shorter
  side resized, central square), mirrored, and a random ``view_size`` px square cut from it without
  rescaling; ``resized``: a random resized crop (``crop_scale``) to ``view_size``.
- Targets (``target_stride``): the official net samples the ab channels at every 8th pixel
  (``data_ab_ss``: a 1 x 1 conv of stride 8, 23 x 23 of a 180 px crop) and resizes its fc8 map
  bilinearly to that grid (``fc8_upsample``); ``target_stride`` s does the same (the logits resized
  to the ab taken at rows and columns 0, s, 2s, ...); 0: the ab channels average-pooled to the
  map's resolution instead (this project's earlier rule).
- Soft encoding over the ``soft_k`` nearest bins with a Gaussian of ``soft_sigma`` = 5, normalised:
  the official training layer (``resources/caffe_traininglayers.py`` NNEncLayer: NN 10, sigma 5;
  the paper's sec. 2.1 says 5 neighbours, the code uses 10).
- Non-grey mask (``nongray_mask``, NonGrayMaskLayer): an image none of whose sampled target
  pixels has |a| or |b| above 5 is treated as grayscale and its pixels get weight 0.
- Loss: the multinomial cross-entropy of eq. 2, each pixel weighted by the rebalancing
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
- Official AlexNet settings (``train_alexnet``): batch 80 of 180 px crops on one GPU, Adam lr 3e-5
  (betas 0.9, 0.999; weight decay 1e-3 coupled as Caffe's L2), biases at lr_mult 2, 450k
  iterations. The history logs
  ``pretext_acc``: how often the most likely bin is the nearest bin of the true colour.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from selfsup.core import dist
from selfsup.augment.batched import ViewSpec
from selfsup.augment.colour import (BIN_RULES, ab_bins, annealed_mean, empirical_prior, lab_to_rgb, nearest_bin,
                            rebalance_weights, rgb_to_lab, smooth_prior, soft_encode)
from selfsup.losses.colourisation import colour_loss
from selfsup.core.config import ConfigError, non_negative, one_of, positive
from selfsup.engine.config import TrainCfg
from selfsup.methods import register
from selfsup.engine.contract import Batch, EpochPlan, Method, StepOut, TrainContext, view_spec
from selfsup.models.backbones import probe_points


@dataclass
class ColorizationCfg(TrainCfg):
    grid: int = 10  # ab bin side (paper: 10)
    # which lattice points are bins (selfsup.augment.colour.ab_bins): hull = the official 313 at grid 10
    # (richzhang/colorization pts_in_hull.npy); cells = the 262 cells an sRGB colour rounds into
    bins: str = "hull"
    soft_k: int = 10  # nearest bins of the soft encoding (official NNEncLayer: NN 10; paper sec. 2.1: 5)
    soft_sigma: float = 5.0  # its Gaussian (paper and NNEncLayer: 5)
    # images whose sampled ab all lie within [-5, 5] get weight 0 (official NonGrayMaskLayer, thresh 5)
    nongray_mask: bool = True
    # targets at every s-th pixel and the logits resized bilinearly to them (official data_ab_ss:
    # stride 8 in train_alexnet/train_val.prototxt); 0: ab average-pooled to the logits' map
    target_stride: int = 8
    # fixed: a random view_size crop of the image at load_size, no rescaling (official data layer:
    # crop_size 180 of 256 px images); resized: a random resized crop (crop_scale) to view_size
    train_crop: str = "fixed"
    # the side the fixed crop is cut from (official: the 256 px database images, colorization_imagenet sets
    # it); 0: the dataset's own side, so a typed default never upsamples small images (CIFAR's 32 px) first
    load_size: int = 0
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
        non_negative(p, self, "hidden", "view_size", "target_stride", "load_size")
        one_of(p, "bins", self.bins, BIN_RULES)
        one_of(p, "train_crop", self.train_crop, ("fixed", "resized"))
        if self.train_crop == "fixed" and self.load_size and self.view_size > self.load_size:
            raise ConfigError(f"{p}.view_size: the fixed crop ({self.view_size}) exceeds load_size ({self.load_size})")
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
        self.register_buffer("centres", ab_bins(cfg.grid, rule=cfg.bins))  # (Q, 2)
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
        if self.cfg.train_crop == "fixed":  # the whole image at load_size (0: the dataset's); forward cuts the crop
            return [dataclasses.replace(view_spec(self.cfg), crop=False, size=self.cfg.load_size)]
        return [dataclasses.replace(view_spec(self.cfg), size=self.cfg.view_size)]

    def train_view(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, L, L) loaded views -> (B, C, S, S): with ``train_crop: fixed`` a random S = ``view_size``
        px square of each (uniform position, no rescaling, as Caffe's crop_size), else ``x``; draws from
        the global RNG, which the loop seeds per (run seed, epoch, batch)."""
        s, side = self.cfg.view_size, x.shape[-1]
        if self.cfg.train_crop != "fixed" or not s or s >= side:
            return x
        b = len(x)
        top = torch.randint(0, side - s + 1, (b,), device=x.device)  # (B,)
        left = torch.randint(0, side - s + 1, (b,), device=x.device)  # (B,)
        ar = torch.arange(s, device=x.device)  # (S,)
        rows = (top[:, None] + ar)[:, :, None]  # (B, S, 1)
        cols = (left[:, None] + ar)[:, None, :]  # (B, 1, S)
        out = x[torch.arange(b, device=x.device)[:, None, None], :, rows, cols]  # (B, S, S, C)
        return out.permute(0, 3, 1, 2)

    def targets(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, 3, S, S) normalised views -> (B, 2, h, w) ab targets: every ``target_stride``-th pixel
        (rows and columns 0, s, 2s, ... as the official stride-8 1 x 1 conv), or with stride 0 the ab
        average-pooled to ``size`` (the logits' map)."""
        ab = rgb_to_lab(self.rgb(x))[:, 1:]  # (B, 2, S, S)
        s = self.cfg.target_stride
        if s:
            return ab[:, :, ::s, ::s]  # (B, 2, ceil(S / s), ceil(S / s))
        return nn.functional.adaptive_avg_pool2d(ab, size)  # (B, 2, h, w)

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
            counts += empirical_prior(rgb_to_lab(self.rgb(self.train_view(b.x)))[:, 1:], self.centres).to(counts)
        dist.all_reduce(counts)
        self.prior.copy_(smooth_prior(counts, self.centres, self.cfg.prior_sigma))
        self.weights.copy_(rebalance_weights(self.prior, self.cfg.rebalance_lambda).to(self.weights))

    def forward(self, batch: Batch) -> StepOut:
        x = self.train_view(batch.x)  # (B, 3, S, S)
        logits = self.logits(x)  # (B, Q, h, w)
        with torch.no_grad():
            ab = self.targets(x, logits.shape[-2:])  # (B, 2, t, t)
            target = soft_encode(ab, self.centres, self.cfg.soft_k, self.cfg.soft_sigma)  # (B, Q, t, t)
            mask = None
            if self.cfg.nongray_mask:  # NonGrayMaskLayer: 1 if any sampled |a| or |b| exceeds 5
                mask = (ab.abs() > 5.0).flatten(1).any(1).float()  # (B,)
        if logits.shape[-2:] != ab.shape[-2:]:  # the official fc8_upsample: bilinear to the target grid
            logits = nn.functional.interpolate(logits, size=ab.shape[-2:], mode="bilinear", align_corners=False)
        loss = colour_loss(logits, target, self.weights, mask)
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

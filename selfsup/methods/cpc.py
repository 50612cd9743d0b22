"""CPC v2: contrastive predictive coding on a grid of image patches (Hénaff et al., "Data-Efficient
Image Recognition with Contrastive Predictive Coding", ICML 2020; the image version of van den Oord,
Li & Vinyals 2018, sec. 3.3). There is no official code release; the paper's appendix gives the
context network and the loss as pseudocode, which this file follows.

- The grid (v1 sec. 3.3): each training view (``view_size`` px; paper 256) is cut into overlapping
  square patches of ``patch`` px on a ``stride`` px pitch (paper 64 on 32: a 7 x 7 grid), row by row
  (``selfsup.models.backbones.patch_grid``). ``patch`` 0 is a quarter of the view and ``stride`` 0
  half the patch, the paper's ratios, so small images get a scaled grid.
- Patch augmentation (v2 sec. 4.1, "patch-based augmentation"), each patch on its own: a horizontal
  flip with probability 1/2 (``patch_flip``), ``colour_drop`` (two of the three colour channels set to
  zero, i.e. to the dataset mean; a no-op on grayscale data), and v1's sub-crop (``patch_crop``: a
  random square of 60/64 of the side kept, the rest zero-padded back to the patch).
- The encoder (``<backbone>``, paper ResNet-161) embeds every patch to a vector, the trunk's pooled
  output, with ``norm: layer`` (v2 sec. 4.1: layer norm instead of batch norm, which would let
  patches of a batch see each other): ``selfsup.models.backbones.layer_norm_trunk``.
- Per direction (``directions``; v2 sec. 4.1 predicts "from both directions": ``down``, top to
  bottom, and ``up``; ``right`` / ``left`` are the same along the rows), the grid of embeddings is
  turned so that the prediction runs down it, and a masked context network (``MaskedContext``: the
  appendix's ``pixelCNN``, ``context_blocks`` residual blocks of width ``context_width``) gives each
  location a context c_ij that depends on rows <= i only.
- Targets: a 1x1 conv of the embeddings to ``target_dim`` (pseudocode 64), shared by the directions.
  Predictions: per direction and offset k, a 1x1 conv of the context to ``target_dim``, times
  ``emb_scale`` (0.1). The offsets are k = i + 1 for i in [``steps_to_ignore``, ``steps_to_predict``)
  (the pseudocode's loop; its values 2 and 3 predict three rows down).
- The loss (``selfsup.losses.cpc``): InfoNCE of each prediction against the targets of every location
  of every image of the batch, the true one the positive; summed over offsets and directions, each a
  mean over its predicted locations. Several processes: the candidates are the targets of all ranks
  (``gather_negatives``).
- Evaluation (``eval_on: grid``, v1 sec. 3.3): the saved encoder resizes an image to ``view_size``,
  encodes its grid of patches and averages the patch features (``Backbone.grid``), which the kNN,
  linear and per-layer protocols read; ``image``: the trunk on the whole image. ``eval_stride``
  evaluates a coarser grid of the same patches (0: the training pitch, the paper's). Detection
  transfer runs the trunk on whole images, as the paper's Faster R-CNN does.

Defaults: the settings the papers state (v1 sec. 3.3: Adam, lr 2e-4, batch 16 per GPU on 32 GPUs; a
random 256 px crop of the 300 px image, i.e. 73 % of its area, with flips). The epochs are not
stated in either paper; the number here is this project's choice (the presets declare it).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.augment.batched import ViewSpec
from selfsup.core.config import ConfigError, non_negative, one_of, positive
from selfsup.engine.config import TrainCfg
from selfsup.engine.contract import Batch, Method, StepOut, view_spec
from selfsup.losses.cpc import cpc_candidates, cpc_infonce
from selfsup.methods import register
from selfsup.models.backbones import NORMS, grid_side, patch_grid
from selfsup.models.context import MaskedContext

DIRECTIONS = ("down", "up", "right", "left")


@dataclass
class CPCCfg(TrainCfg):
    # v1 sec. 3.3: Adam at 2e-4, 16 images per GPU on 32 GPUs; epochs not stated (this project's choice)
    epochs: int = 100
    batch_size: int = 16
    optimizer: str = "adam"
    lr: float = 2e-4
    weight_decay: float = 0.0
    augment: str = "crop_flip"
    crop_scale: list[float] = field(default_factory=lambda: [0.728, 0.728])  # 256^2 / 300^2 (v1)
    # the grid
    view_size: int = 0  # side of the view the grid is cut from (0: the dataset's; paper 256)
    patch: int = 0  # patch side in px (0: view / 4, the paper's 64 of 256)
    stride: int = 0  # pitch in px (0: patch / 2, the paper's 32: 50 % overlap)
    # patch augmentation (v2 sec. 4.1; v1 sec. 3.3 for the sub-crop)
    patch_flip: bool = True
    colour_drop: bool = True  # two of three channels dropped per patch (no-op on grayscale)
    patch_crop: float = 0.9375  # side share kept by v1's random sub-crop (60 / 64); 1: off
    # the encoder's normalisation (v2: layer; batch: v1's batch norm)
    norm: str = "layer"
    # the context network and the predictions (the appendix pseudocode)
    context_width: int = 256
    context_blocks: int = 5
    target_dim: int = 64
    emb_scale: float = 0.1
    steps_to_ignore: int = 2
    steps_to_predict: int = 3
    directions: list[str] = field(default_factory=lambda: ["down", "up"])
    gather_negatives: bool = True  # several processes: every rank's targets are candidates
    eval_on: str = "grid"  # grid: mean-pooled patch features (v1 sec. 3.3) | image: the trunk on the image
    eval_stride: int = 0  # the evaluated grid's pitch in px (0: ``stride``, the paper's; larger: fewer patches)

    def check(self, p: str) -> None:
        super().check(p)
        non_negative(p, self, "view_size", "patch", "stride", "steps_to_ignore", "eval_stride")
        positive(p, self, "context_width", "context_blocks", "target_dim", "emb_scale", "steps_to_predict")
        one_of(p, "norm", self.norm, NORMS)
        one_of(p, "eval_on", self.eval_on, ("grid", "image"))
        if not 0.0 < self.patch_crop <= 1.0:
            raise ConfigError(f"{p}.patch_crop: the share of the patch side kept, in (0, 1], got {self.patch_crop}")
        if self.steps_to_ignore >= self.steps_to_predict:
            raise ConfigError(f"{p}.steps_to_ignore: {self.steps_to_ignore} leaves no offset below steps_to_predict "
                              f"({self.steps_to_predict})")
        if not self.directions or len(set(self.directions)) != len(self.directions):
            raise ConfigError(f"{p}.directions: distinct entries of {', '.join(DIRECTIONS)}, got {self.directions}")
        for d in self.directions:
            one_of(p, "directions", d, DIRECTIONS)
        if self.sobel:
            raise ConfigError(f"{p}.sobel: CPC's patches take the images as they are (no Sobel front end)")

    @property
    def offsets(self) -> list[int]:
        return [i + 1 for i in range(self.steps_to_ignore, self.steps_to_predict)]


def grid_geometry(cfg: CPCCfg, side: int, key: str = "cpc") -> tuple[int, int, int]:
    """(patch, stride, grid side) for a ``side`` px view; ConfigError naming the key when they do not fit."""
    patch = cfg.patch or max(1, side // 4)
    stride = cfg.stride or max(1, patch // 2)
    if patch > side:
        raise ConfigError(f"{key}.patch: {patch} px patches do not fit a {side} px view")
    if (side - patch) % stride:
        raise ConfigError(f"{key}.stride: {stride} px does not tile a {side} px view with {patch} px patches "
                          f"((view - patch) must be a multiple of the stride)")
    g = grid_side(side, patch, stride)
    if g <= cfg.offsets[-1]:
        raise ConfigError(f"{key}.steps_to_predict: offset {cfg.offsets[-1]} needs more than {cfg.offsets[-1]} "
                          f"rows, the {side} px view has a {g} x {g} grid")
    return patch, stride, g


def orient(x: torch.Tensor, direction: str) -> torch.Tensor:
    """(B, C, H, W) grid turned so that ``direction`` runs down its rows (its own inverse for down / up)."""
    if direction == "up":
        return x.flip(2)
    if direction == "right":
        return x.transpose(2, 3)
    if direction == "left":
        return x.transpose(2, 3).flip(2)
    return x


@register
class CPC(Method):
    name = "cpc"
    Config = CPCCfg

    def __init__(self, backbone: Any, cfg: CPCCfg, num_classes: int):
        super().__init__(backbone, cfg, num_classes)
        d = backbone.out_dim
        self.target = nn.Conv2d(d, cfg.target_dim, 1)
        self.context = nn.ModuleDict({r: MaskedContext(d, cfg.context_width, cfg.context_blocks)
                                      for r in cfg.directions})
        self.predict = nn.ModuleDict({r: nn.ModuleList(nn.Conv2d(d, cfg.target_dim, 1) for _ in cfg.offsets)
                                      for r in cfg.directions})

    @classmethod
    def backbone_options(cls, cfg: CPCCfg, meta: dict[str, Any], image_size: int) -> dict[str, Any]:
        side = cfg.view_size or image_size
        patch, stride, _ = grid_geometry(cfg, side)
        pitch = cfg.eval_stride or stride
        if (side - patch) % pitch:
            raise ConfigError(f"cpc.eval_stride: {pitch} px does not tile a {side} px view with {patch} px patches")
        grid = {"view": side, "patch": patch, "stride": pitch} if cfg.eval_on == "grid" else None
        return {"norm": cfg.norm, "grid": grid}

    def view_specs(self) -> list[ViewSpec]:
        return [replace(view_spec(self.cfg, 1), size=self.cfg.view_size)]

    def augment_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, p, p) patches -> the per-patch augmentations (global RNG, seeded per batch by the loop)."""
        c = self.cfg
        n, ch, p, _ = x.shape
        if c.patch_flip:
            flip = torch.rand(n, device=x.device) < 0.5  # (N,)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if c.colour_drop and ch == 3:
            keep = torch.randint(0, 3, (n,), device=x.device)  # (N,) the one channel kept
            x = x * F.one_hot(keep, 3).to(x.dtype)[:, :, None, None]
        q = round(p * c.patch_crop)
        if q < p:  # a random q x q window kept, zero around it (v1: a 60 px sub-crop padded back to 64)
            off = torch.randint(0, p - q + 1, (n, 2), device=x.device)  # (N, 2) top, left
            ar = torch.arange(p, device=x.device)
            rows = (ar[None] >= off[:, :1]) & (ar[None] < off[:, :1] + q)  # (N, p)
            cols = (ar[None] >= off[:, 1:]) & (ar[None] < off[:, 1:] + q)  # (N, p)
            x = x * (rows[:, :, None] & cols[:, None, :]).to(x.dtype)[:, None]
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) views -> (B, D, G, G) patch embeddings, the patches augmented."""
        patch, stride, g = grid_geometry(self.cfg, x.shape[-1])
        b = len(x)
        patches = self.augment_patches(patch_grid(x, patch, stride).flatten(0, 2))  # (B G G, C, p, p)
        z = self.backbone.trunk(patches)  # (B G G, D); no front end (validated)
        return z.view(b, g, g, -1).permute(0, 3, 1, 2)  # (B, D, G, G)

    def forward(self, batch: Batch) -> StepOut:
        c = self.cfg
        z = self.embed(batch.x)  # (B, D, G, G)
        targets = self.target(z)  # (B, T, G, G)
        loss = z.new_zeros((), dtype=torch.float32)
        logs: dict[str, torch.Tensor] = {}
        for r in c.directions:
            ctx = self.context[r](orient(z, r))  # (B, D, G, G), row i sees rows <= i
            tgt = orient(targets, r).permute(0, 2, 3, 1)  # (B, G, G, T)
            cand, start = cpc_candidates(tgt, c.gather_negatives)
            for k, head in zip(c.offsets, self.predict[r]):
                pred = head(ctx[:, :, :-k]) * c.emb_scale  # (B, T, G - k, G): rows 0..G-k-1 predict rows k..G-1
                part = cpc_infonce(pred.permute(0, 2, 3, 1), tgt, k, cand, start)
                logs[f"loss_{r}_{k}"] = part.detach()
                loss = loss + part
        return StepOut(loss, logs)

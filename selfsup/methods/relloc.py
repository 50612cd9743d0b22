"""Relative patch location (Doersch, Gupta, Efros, "Unsupervised Visual Representation Learning by
Context Prediction", ICCV 2015): take the centre patch of a 3 x 3 grid and one of its eight
neighbours, and predict where the neighbour lies (an 8-way classification, sec. 3).

- Patches (sec. 3.1): on ImageNet 96 px patches on a 144 px pitch (a 48 px gap, "half the patch
  size", so that edges and textures continuing across the boundary do not give the answer away),
  each patch jittered by up to 7 px. Here the view (``view_size``) is cut into 3 x 3 cells; each
  patch sits at the centre of its cell (side ``patch_size``, default 96/144 of the cell) moved by a
  uniform integer jitter in [-``patch_jitter``, ``patch_jitter``] px per axis (default 7/48 of the gap). The
  ``jigsaw`` tile cutter (``cut_tiles``) does the cropping.
- Labels (Fig. 2): the neighbour's cell in row-major order with the centre left out: 0 = top-left,
  1 = top, 2 = top-right, 3 = left, 4 = right, 5 = bottom-left, 6 = bottom, 7 = bottom-right. One
  random neighbour per image and step (as the official sampler draws one pair per image).
- The pair network (late fusion, Fig. 3): one trunk with shared weights per patch (AlexNet to fc6
  in the paper), the two feature vectors concatenated (centre first), then fc (``hidden``; paper
  fc7 4096), ReLU and the 8-way classifier. The evaluated encoder is the trunk alone.
- The chromatic-aberration shortcut (sec. 3.2): lenses shift the colour channels relative to each
  other in proportion to the distance from the image centre, so the green-magenta fringes tell a
  network where a patch lies. ``chroma``: ``project`` (the paper's first remedy: shift green and
  magenta towards grey, i.e. remove each pixel's component along the green-magenta axis
  (-1, 2, -1) / sqrt 6), ``drop`` (its second: keep one random channel per patch and replace the
  other two with Gaussian noise of 1/100 that channel's standard deviation), or ``none``. The paper
  reports both remedies work; which one its released model used is not verified here, so the
  default is ``project``. Both need three channels: on a grayscale dataset the guard is a no-op.
- The paper also downsamples some patches to ~100 pixels and back ("pixelation") against
  fine-detail shortcuts; not implemented (a documented difference).
- The history logs ``pretext_acc`` (the location accuracy on the training batches).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selfsup.augment import ViewSpec
from selfsup.config import ConfigError, TrainCfg, non_negative, one_of
from selfsup.heads import projection_head
from selfsup.methods import register
from selfsup.methods.base import Batch, Method, StepOut, view_spec
from selfsup.methods.jigsaw import GRID, cut_tiles

NEIGHBOURS = [0, 1, 2, 3, 5, 6, 7, 8]  # label -> cell index (row-major 3 x 3; 4 is the centre)
CENTRE = 4
CHROMA = ("project", "drop", "none")


def neighbour_offset(label: int) -> tuple[int, int]:
    """(d_row, d_col) of the neighbour with ``label`` relative to the centre cell."""
    r, c = divmod(NEIGHBOURS[label], GRID)
    return r - 1, c - 1


def project_green_magenta(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> the same with each pixel's component along the green-magenta axis removed
    (sec. 3.2, "projection")."""
    axis = torch.tensor([-1.0, 2.0, -1.0], device=x.device, dtype=x.dtype) / math.sqrt(6.0)  # (3,)
    along = torch.einsum("bchw,c->bhw", x, axis)  # (B, H, W)
    return x - along[:, None] * axis[None, :, None, None]


def drop_colours(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> one random channel kept per patch, the other two Gaussian noise of 1/100 of
    that channel's standard deviation (sec. 3.2, "color dropping"); draws from the global RNG."""
    b = len(x)
    keep = torch.randint(0, 3, (b,), device=x.device)  # (B,)
    kept = x[torch.arange(b, device=x.device), keep]  # (B, H, W)
    sd = kept.flatten(1).std(1).clamp_min(1e-6)[:, None, None, None] / 100.0  # (B, 1, 1, 1)
    out = torch.randn_like(x) * sd
    mask = nn.functional.one_hot(keep, 3).to(x.dtype)[:, :, None, None]  # (B, 3, 1, 1)
    return out * (1 - mask) + x * mask


@dataclass
class RelLocCfg(TrainCfg):
    view_size: int = 0  # side of the view the grid is cut from (0: the dataset's; paper: 3 x 144 = 432 px of context)
    patch_size: int = 0  # 0: 96/144 of the cell, the paper's ratio
    patch_jitter: int = -1  # px per axis; -1: 7/48 of the gap, the paper's ratio
    chroma: str = "project"  # project | drop | none: the chromatic-aberration guard (sec. 3.2)
    hidden: int = 0  # fc after the concatenated pair (paper fc7: 4096); 0: the backbone's width
    head_bn: bool = False  # batch norm after that fc (the paper's CaffeNet fc7 has none)

    def check(self, p: str) -> None:
        super().check(p)
        non_negative(p, self, "view_size", "patch_size", "hidden")
        if self.patch_jitter < -1:
            raise ConfigError(f"{p}.patch_jitter: must be >= 0 (or -1 for the paper's ratio), got {self.patch_jitter}")
        one_of(p, "chroma", self.chroma, CHROMA)


@register
class RelLoc(Method):
    name = "relloc"
    Config = RelLocCfg

    def __init__(self, backbone: Any, cfg: RelLocCfg, num_classes: int):
        super().__init__(backbone, cfg, num_classes)
        d = backbone.out_dim
        self.patch_act = nn.Sequential(*([nn.ReLU()] if backbone.relu_head else []))
        # fc over the concatenated pair, ReLU, the 8-way classifier
        self.head = projection_head("mlp", 2 * d, len(NEIGHBOURS), cfg.hidden or d, bn=cfg.head_bn)

    def view_specs(self) -> list[ViewSpec]:
        return [dataclasses.replace(view_spec(self.cfg), size=self.cfg.view_size)]

    def geometry(self, side: int) -> tuple[int, int, int]:
        """(cell, patch, jitter) in px for a ``side`` px view."""
        cell = side // GRID
        p = self.cfg.patch_size or max(1, round(cell * 96 / 144))
        if p > cell:
            raise ConfigError(f"relloc.patch_size: {p} exceeds the {cell} px cells of a {side} px view")
        gap = cell - p
        j = round(gap * 7 / 48) if self.cfg.patch_jitter < 0 else self.cfg.patch_jitter
        if 2 * j > gap:
            raise ConfigError(f"relloc.patch_jitter: {j} px moves patches out of their {cell} px cells "
                              f"(at most {gap // 2} with {p} px patches)")
        return cell, p, j

    def sample_pairs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, S, S) views -> ((B, 2, C, p, p) centre and neighbour patches, (B,) labels); draws
        from the global RNG, which the loop seeds per (run seed, epoch, batch): resumable."""
        b = len(x)
        cell, p, j = self.geometry(x.shape[-1])
        label = torch.randint(0, len(NEIGHBOURS), (b,), device=x.device)  # (B,)
        # every cell's jitter is drawn (the draws do not depend on the label); only the pair is cut
        offsets = (cell - p) // 2 + torch.randint(-j, j + 1, (b, GRID * GRID, 2), device=x.device)  # (B, 9, 2)
        cells = torch.stack([torch.full_like(label, CENTRE),
                             torch.tensor(NEIGHBOURS, device=x.device)[label]], 1)  # (B, 2)
        return cut_tiles(x, p, offsets, cells), label  # (B, 2, C, p, p)

    def guard(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, C, p, p) -> the chromatic-aberration guard applied per patch (no-op unless C == 3)."""
        if patches.shape[1] != 3 or self.cfg.chroma == "none":
            return patches
        return project_green_magenta(patches) if self.cfg.chroma == "project" else drop_colours(patches)

    def forward(self, batch: Batch) -> StepOut:
        pairs, label = self.sample_pairs(batch.x)  # (B, 2, C, p, p), (B,)
        b = len(pairs)
        f = self.patch_act(self.backbone(self.guard(pairs.flatten(0, 1))))  # (2B, D): one trunk for both
        logits = self.head(f.view(b, -1)).float()  # (B, 8): centre features first, then the neighbour's
        loss = nn.functional.cross_entropy(logits, label)
        return StepOut(loss, {"pretext_acc": (logits.argmax(1) == label).float().mean().detach()})

"""Relative patch location (Doersch, Gupta, Efros, "Unsupervised Visual Representation Learning by
Context Prediction", ICCV 2015): take the centre patch of a 3 x 3 grid and one of its eight
neighbours, and predict where the neighbour lies (an 8-way classification, sec. 3).

- Patches (sec. 3.1): on ImageNet 96 px patches on a 144 px pitch (a 48 px gap, "half the patch
  size", so that edges and textures continuing across the boundary do not give the answer away),
  each patch jittered by up to 7 px. Here the view (``view_size``) is cut into 3 x 3 cells; each
  patch sits at the centre of its cell (side ``patch_size``, default 96/144 of the cell) moved by a
  uniform integer jitter in [-``patch_jitter``, ``patch_jitter``] px per axis (default 7/48 of the gap). The
  ``jigsaw`` tile cutter (``cut_tiles``) does the cropping. The official image is instead resized to
  a random 150,000-450,000 pixels with its aspect kept and covered by a grid of 2 x 2 to 5 x 5
  patches at a random offset; the method contract hands methods square views of one size, so here
  each grid is the 3 x 3 grid of a view.
- Labels (Fig. 2): the second patch's cell relative to the first in row-major order with the centre
  left out: 0 = top-left, 1 = top, 2 = top-right, 3 = left, 4 = right, 5 = bottom-left, 6 = bottom,
  7 = bottom-right (the official ``pos2lbl``).
- Pairs (``pairs_per_image``): ``dense``, as the released sampler (``cdoersch/deepcontext@5307282
  train.py`` imgloader): every patch of the grid paired with each of its 8-neighbours, both orders
  (20 adjacent pairs, 40 ordered, per 3 x 3 grid), ``grids_per_image`` grids per image (official
  num_grids 4; here each grid is cut from its own view); ``centre``: one random neighbour of the
  centre patch per image and step (this project's earlier sampler).
- The pair network (late fusion, Fig. 3; the released ``gen_net``): one trunk with shared weights
  per patch (AlexNet to fc6), the two feature vectors concatenated (first patch first), then
  ``head_layers`` fc layers of width ``hidden`` with ReLU (official fc7 with BatchNorm, ``head_bn``,
  and fc8 without: 2 layers of 4096) and the 8-way fc9. The evaluated encoder is the trunk alone.
- Loss (``loss_reduction``): the official SoftmaxWithLoss has normalization NONE, the cross-entropy
  summed over the batch's pairs, so its lr 1e-5 multiplies a sum; ``mean`` averages instead.
- Patch preprocessing, per patch in this order (the released ``prep_image``):
  1. pixelation (``pixelation_p``, official 0.33): downsampled to a random total of 100 to 9,025
     pixels (side int(sqrt(U(100, 9025))), for 96 px patches; scaled by side / 96 for other patch
     sides) and back, bilinear (the official skimage resize; its constant-mode border, which blends
     the outermost half pixel with black, is not reproduced: edges replicate here);
  2. the chromatic-aberration guard (``chroma``; sec. 3.2: lenses shift the colour channels in
     proportion to the distance from the image centre): ``drop`` (the released code, the default:
     one random channel kept, the other two replaced by noise, ``drop_noise``: ``uniform`` in
     [-0.5, 0.5] pixel levels as the code, ``gaussian`` of 1/100 the kept channel's standard
     deviation as the paper's text), ``project`` (the paper's other remedy: each pixel's component
     along the green-magenta axis (-1, 2, -1) / sqrt 6 removed) or ``none``. Both need three
     channels: on a grayscale dataset the guard is a no-op;
  3. ``patch_norm`` (official): the kept channels' means removed and the whole patch scaled to an
     RMS of ``patch_rms`` = 50 pixel levels, "so that the variance is roughly the same as the usual
     AlexNet inputs" (mean-subtracted 0-255 pixels). This project's encoders see per-channel
     normalised inputs, (pixel / 255 - mean) / std, so the patches are taken to pixel levels
     (x * 255 * std), prepared there, and handed to the trunk in its input units again (divided by
     255 * std): the trunk sees them at the scale of the images it is evaluated on, as the
     official trunk does.
- The history logs ``pretext_acc`` (the location accuracy on the training pairs).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from selfsup.augment.batched import ViewSpec
from selfsup.core.config import ConfigError, non_negative, one_of, positive
from selfsup.engine.config import TrainCfg
from selfsup.methods import register
from selfsup.engine.contract import Batch, Method, StepOut, view_spec
from selfsup.methods.jigsaw import GRID, cut_tiles

NEIGHBOURS = [0, 1, 2, 3, 5, 6, 7, 8]  # label -> cell index (row-major 3 x 3; 4 is the centre)
CENTRE = 4
CHROMA = ("project", "drop", "none")
PIX_RANGE = (10 * 10, 95 * 95)  # official prep_image: total pixels of a pixelated 96 px patch
PIX_PATCH = 96  # the patch side that range is for


def neighbour_offset(label: int) -> tuple[int, int]:
    """(d_row, d_col) of the neighbour with ``label`` relative to the centre cell."""
    r, c = divmod(NEIGHBOURS[label], GRID)
    return r - 1, c - 1


def dense_pairs(grid: int = GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered pair of 8-adjacent cells of a ``grid`` x ``grid`` grid (the official sampler pairs
    each patch with its 4 earlier neighbours, both orders): ((P, 2) long cell indices, row-major;
    (P,) long labels of the second cell relative to the first)."""
    pairs, labels = [], []
    for r in range(grid):
        for c in range(grid):
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    if (dr or dc) and 0 <= r + dr < grid and 0 <= c + dc < grid:
                        pairs.append((r * grid + c, (r + dr) * grid + c + dc))
                        labels.append(NEIGHBOURS.index((dr + 1) * GRID + dc + 1))
    return torch.tensor(pairs), torch.tensor(labels)


def project_green_magenta(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> the same with each pixel's component along the green-magenta axis removed
    (sec. 3.2, "projection")."""
    axis = torch.tensor([-1.0, 2.0, -1.0], device=x.device, dtype=x.dtype) / math.sqrt(6.0)  # (3,)
    along = torch.einsum("bchw,c->bhw", x, axis)  # (B, H, W)
    return x - along[:, None] * axis[None, :, None, None]


def drop_colours(x: torch.Tensor, keep: torch.Tensor | None = None, noise: str = "gaussian",
                 draw: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W) -> one channel kept per patch (``keep`` (B,), drawn from the global RNG if None),
    the other two replaced by noise (sec. 3.2, "color dropping"): ``uniform`` in [-0.5, 0.5] (the
    released prep_image, in pixel levels), ``gaussian`` with 1/100 of the kept channel's standard
    deviation (the paper's text). ``draw``: the (B, 3, H, W) standard noise (U(0, 1) or N(0, 1))."""
    b = len(x)
    if keep is None:
        keep = torch.randint(0, 3, (b,), device=x.device)  # (B,)
    if draw is None:
        draw = torch.rand_like(x) if noise == "uniform" else torch.randn_like(x)
    if noise == "uniform":
        out = draw - 0.5  # (B, 3, H, W)
    else:
        kept = x[torch.arange(b, device=x.device), keep]  # (B, H, W)
        out = draw * (kept.flatten(1).std(1).clamp_min(1e-6)[:, None, None, None] / 100.0)
    mask = nn.functional.one_hot(keep, 3).to(x.dtype)[:, :, None, None]  # (B, 3, 1, 1)
    return out * (1 - mask) + x * mask


def resample_matrix(p: int, s: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(p, p): a length-p signal linearly resampled to s samples and back (align_corners False,
    edges replicated), as one matrix: rows of the result are out = M @ signal."""
    eye = torch.eye(p, dtype=dtype)[None]  # (1, p, p): p channels, each a unit signal
    down = nn.functional.interpolate(eye, size=s, mode="linear", align_corners=False)  # (1, p, s)
    up = nn.functional.interpolate(down, size=p, mode="linear", align_corners=False)  # (1, p, p)
    return up[0].t().contiguous()  # (p, p): column j = the image of unit signal j


def pixelate(x: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
    """(N, C, p, p) patches -> each with ``sides[n]`` > 0 bilinearly downsampled to sides[n] x sides[n]
    and back (separable: M x M^T per patch); sides[n] == 0 leaves the patch as it is."""
    p = x.shape[-1]
    sel = (sides > 0).nonzero().squeeze(1)  # (k,)
    if not len(sel):
        return x
    uniq, inv = torch.unique(sides[sel].cpu(), return_inverse=True)
    mats = torch.stack([resample_matrix(p, int(v), x.dtype) for v in uniq]).to(x.device)  # (U, p, p)
    m = mats[inv.to(x.device)]  # (k, p, p)
    out = x.clone()
    out[sel] = torch.einsum("kij,kcjl,kml->kcim", m, x[sel], m)  # rows M x, columns x M^T
    return out


@dataclass
class RelLocCfg(TrainCfg):
    view_size: int = 0  # side of the view the grid is cut from (0: the dataset's; paper: 3 x 144 = 432 px of context)
    patch_size: int = 0  # 0: 96/144 of the cell, the paper's ratio
    patch_jitter: int = -1  # px per axis; -1: 7/48 of the gap, the paper's ratio
    # the chromatic-aberration guard (sec. 3.2); drop: the released code's (prep_image)
    chroma: str = "drop"  # drop | project | none
    drop_noise: str = "uniform"  # dropped channels: uniform in [-0.5, 0.5] levels (prep_image) | gaussian (paper's text)
    pixelation_p: float = 0.33  # share of patches pixelated (prep_image: random() < .33)
    patch_norm: bool = True  # per-patch mean removal and RMS scaling (prep_image)
    patch_rms: float = 50.0  # that RMS in 0-255 pixel levels (prep_image: "* 50")
    hidden: int = 0  # fc width after the concatenated pair (official fc7 / fc8: 4096); 0: the backbone's width
    head_layers: int = 2  # fc + ReLU layers before the 8-way fc9 (official gen_net: fc7, fc8)
    head_bn: bool = False  # batch norm (no affine) after the first fc (official fc7 with use_bn; fc8 has none)
    pairs_per_image: str = "dense"  # dense: every adjacent pair, both orders (imgloader) | centre: one random neighbour
    grids_per_image: int = 4  # grids (views) per image with dense pairs (imgloader num_grids 4)
    # sum: the loss summed over pairs (official SoftmaxWithLoss normalization NONE, with lr 1e-5) | mean
    loss_reduction: str = "sum"

    def check(self, p: str) -> None:
        super().check(p)
        non_negative(p, self, "view_size", "patch_size", "hidden")
        positive(p, self, "head_layers", "grids_per_image", "patch_rms")
        if self.patch_jitter < -1:
            raise ConfigError(f"{p}.patch_jitter: must be >= 0 (or -1 for the paper's ratio), got {self.patch_jitter}")
        if not 0.0 <= self.pixelation_p <= 1.0:
            raise ConfigError(f"{p}.pixelation_p: must be in [0, 1], got {self.pixelation_p}")
        one_of(p, "chroma", self.chroma, CHROMA)
        one_of(p, "drop_noise", self.drop_noise, ("uniform", "gaussian"))
        one_of(p, "pairs_per_image", self.pairs_per_image, ("dense", "centre"))
        one_of(p, "loss_reduction", self.loss_reduction, ("sum", "mean"))


@register
class RelLoc(Method):
    name = "relloc"
    Config = RelLocCfg

    def __init__(self, backbone: Any, cfg: RelLocCfg, num_classes: int, std: Sequence[float] | None = None):
        super().__init__(backbone, cfg, num_classes)
        d = backbone.out_dim
        self.patch_act = nn.Sequential(*([nn.ReLU()] if backbone.relu_head else []))
        # fc7 [BN, no affine] ReLU, (head_layers - 1) x (fc ReLU), the 8-way fc9 (official gen_net)
        h = cfg.hidden or d
        mods: list[nn.Module] = [nn.Linear(2 * d, h)]
        if cfg.head_bn:
            mods.append(nn.BatchNorm1d(h, affine=False))
        mods.append(nn.ReLU(inplace=True))
        for _ in range(cfg.head_layers - 1):
            mods += [nn.Linear(h, h), nn.ReLU(inplace=True)]
        mods.append(nn.Linear(h, len(NEIGHBOURS)))
        self.head = nn.Sequential(*mods)
        # pixel levels per input unit, per channel: the dataset normalisation's 255 * std
        levels = torch.tensor([255.0 * float(v) for v in std]) if std is not None else torch.full((1,), 255.0)
        self.register_buffer("levels", levels.view(1, -1, 1, 1), persistent=False)  # (1, C or 1, 1, 1)
        pairs, labels = dense_pairs()
        self.register_buffer("pairs", pairs, persistent=False)  # (P, 2)
        self.register_buffer("pair_labels", labels, persistent=False)  # (P,)

    @classmethod
    def from_data(cls, backbone: Any, cfg: RelLocCfg, data: Any) -> "RelLoc":
        return cls(backbone, cfg, data.num_classes, std=data.meta["std"])

    def view_specs(self) -> list[ViewSpec]:
        count = self.cfg.grids_per_image if self.cfg.pairs_per_image == "dense" else 1
        return [dataclasses.replace(view_spec(self.cfg, count), size=self.cfg.view_size)]

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

    def sample_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) views -> (B, 9, C, p, p): every patch of each view's 3 x 3 grid, jittered as
        ``sample_pairs`` (global RNG)."""
        b = len(x)
        cell, p, j = self.geometry(x.shape[-1])
        offsets = (cell - p) // 2 + torch.randint(-j, j + 1, (b, GRID * GRID, 2), device=x.device)  # (B, 9, 2)
        cells = torch.arange(GRID * GRID, device=x.device).expand(b, -1)  # (B, 9)
        return cut_tiles(x, p, offsets, cells)

    def pixel_sides(self, n: int, p: int, device: torch.device) -> torch.Tensor:
        """(n,) long: the side each patch is pixelated to (0: not pixelated); global RNG. As prep_image:
        side = int(sqrt(U(100, 9025))) for 96 px patches, scaled by p / 96."""
        hit = torch.rand(n, device=device) < self.cfg.pixelation_p  # (n,)
        lo, hi = PIX_RANGE
        side = torch.sqrt(torch.rand(n, device=device, dtype=torch.float64) * (hi - lo) + lo).floor()  # (n,)
        side = (side * p / PIX_PATCH).floor().clamp_min(1).long()
        return torch.where(hit, side, torch.zeros_like(side))

    def prepare(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, C, p, p) patches in input units -> the released prep_image per patch: pixelation, the
        chroma guard (no-op unless C == 3), mean removal and RMS scaling (see the module docstring)."""
        c = self.cfg
        x = patches
        if c.pixelation_p > 0:
            x = pixelate(x, self.pixel_sides(len(x), x.shape[-1], x.device))
        if c.patch_norm:
            x = x * self.levels  # pixel levels (the dataset mean is removed with each patch's)
            x = x - x.mean((2, 3), keepdim=True)  # each channel's patch mean (the kept one's, with drop)
        if x.shape[1] == 3 and c.chroma == "project":
            x = project_green_magenta(x)
        elif x.shape[1] == 3 and c.chroma == "drop":
            x = drop_colours(x, noise=c.drop_noise)
        if c.patch_norm:
            rms = x.pow(2).mean((1, 2, 3), keepdim=True).sqrt().clamp_min(1e-6)  # (N, 1, 1, 1)
            x = x / rms * c.patch_rms / self.levels
        return x

    def guard(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, C, p, p) -> the chromatic-aberration guard alone (no-op unless C == 3)."""
        if patches.shape[1] != 3 or self.cfg.chroma == "none":
            return patches
        if self.cfg.chroma == "project":
            return project_green_magenta(patches)
        return drop_colours(patches, noise=self.cfg.drop_noise)

    def forward(self, batch: Batch) -> StepOut:
        if self.cfg.pairs_per_image == "dense":
            grids = torch.cat([self.sample_grid(v) for v in batch.views])  # (G, 9, C, p, p): G = views x B
            g = len(grids)
            f = self.patch_act(self.backbone(self.prepare(grids.flatten(0, 1))))  # (9G, D): one trunk for all
            f = f.view(g, GRID * GRID, -1)  # (G, 9, D)
            pair = torch.cat([f[:, self.pairs[:, 0]], f[:, self.pairs[:, 1]]], 2)  # (G, P, 2D): first patch first
            logits = self.head(pair.flatten(0, 1)).float()  # (G * P, 8)
            label = self.pair_labels.repeat(g)  # (G * P,)
        else:
            pairs, label = self.sample_pairs(batch.x)  # (B, 2, C, p, p), (B,)
            b = len(pairs)
            f = self.patch_act(self.backbone(self.prepare(pairs.flatten(0, 1))))  # (2B, D): one trunk for both
            logits = self.head(f.view(b, -1)).float()  # (B, 8): centre features first, then the neighbour's
        loss = nn.functional.cross_entropy(logits, label, reduction=self.cfg.loss_reduction)
        return StepOut(loss, {"pretext_acc": (logits.argmax(1) == label).float().mean().detach()})

"""Jigsaw puzzles (Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving
Jigsaw Puzzles", ECCV 2016): cut the view into a 3 x 3 grid of cells, take a tile at a random
position inside each cell (the gaps between tiles keep edges and textures from giving the answer
away, sec. 3.2), shuffle the nine tiles by one of a fixed set of permutations and predict which one.

- The permutation set (``permutation_set``, ``permutation_rule``): the paper's Algorithm 1,
  ``max_mean``: start from a random permutation of the 9! and repeatedly add the one of largest mean
  (equivalently total) Hamming distance to those already chosen, as bbrattoli/JigsawPuzzlePytorch@ec85994
  select_permutations.py (``--selection max``) builds its sets; ties go to the first in lexicographic
  order, as that script's ``argmax`` over the remaining permutations. ``max_min``: the permutation of
  largest minimum distance (an older rule of this project). Size ``permutations`` (paper: 1000).
- Per-tile pre-processing against low-level shortcuts (sec. 3.2): a random ``tile_jitter`` shift of
  each colour channel of each tile (bbrattoli/JigsawPuzzlePytorch@ec85994 Dataset/JigsawImageLoader.py
  ``rgb_jittering``), then the tile normalised on its own (``tile_norm_mode``); 30 % of the images
  grayscale before the cut (``grayscale_p``, the same loader). The Caffe code of the paper
  (MehdiNoroozi/JigsawPuzzleSolver@8041c58) has neither the jitter nor the grayscale images.
- The context-free network (CFN, sec. 3.1; train_val_cfn_jps.prototxt): the backbone applied to every
  tile with shared weights, then per tile fc6 (``tile_fc``, ReLU, dropout), the nine vectors
  concatenated in the shuffled order, fc7 (``hidden``, ReLU, dropout) and the ``permutations``-way
  classifier fc8. The evaluated encoder is the backbone alone (``alexnet_cfn``: conv1-pool5).
- Official ImageNet settings: images resized to 256, a 255 crop cut into 85 px cells, 64 px tiles,
  1000 permutations, 350k iterations of batch 256, lr 0.01 (x0.1 every 100k), biases at lr x2. Small
  images (digits 8 px): the view is upsampled to ``view_size`` first, so the cells hold enough pixels.
- The history logs ``pretext_acc`` (the permutation accuracy on the training batches).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from selfsup.augment.batched import ViewSpec
from selfsup.core.config import ConfigError, non_negative, one_of, positive
from selfsup.engine.config import TrainCfg
from selfsup.methods import register
from selfsup.engine.contract import Batch, Method, StepOut, view_spec

GRID = 3
PERMUTATION_RULES = ("max_mean", "max_min")
TILE_NORMS = ("channel_mean", "channel_mean_std", "mean_std")


@functools.lru_cache(maxsize=4)  # the 9! scan is the cost of a set: once per process
def _permutation_set(n: int, tiles: int, seed: int, rule: str) -> np.ndarray:
    perms = np.array(list(itertools.permutations(range(tiles))), dtype=np.int8)  # (tiles!, tiles), lexicographic
    if not 0 < n <= len(perms):
        raise ValueError(f"permutations: need 1..{len(perms)}, got {n}")
    if rule not in PERMUTATION_RULES:
        raise ValueError(f"permutation_rule: one of {', '.join(PERMUTATION_RULES)}, got {rule!r}")
    # holds[i, v]: the permutations with tile v at position i; a candidate's agreements with a chosen
    # permutation p are sum_i holds[i, p[i]] (its Hamming distance: tiles minus that)
    values = np.arange(tiles, dtype=np.int8)[None, :, None]
    holds = np.ascontiguousarray(perms.T[:, None, :] == values)  # (tiles, tiles, tiles!) bool

    def add_agreements(out: np.ndarray, j: int) -> np.ndarray:  # out (tiles!,) += positions shared with perms[j]
        for i, v in enumerate(perms[j]):
            out += holds[i, v]
        return out

    j = int(np.random.default_rng(seed).integers(len(perms)))
    chosen = [j]
    if rule == "max_mean":
        total = add_agreements(np.zeros(len(perms), np.int32), j)  # (tiles!,): summed over the chosen set
        for _ in range(n - 1):
            # a chosen permutation is never drawn again: tiles * n + 1 lifts it above any total
            total[j] += tiles * n + 1
            j = int(np.argmin(total))  # the largest mean distance is the fewest agreements
            chosen.append(j)
            add_agreements(total, j)
    else:
        dmin = tiles - add_agreements(np.zeros(len(perms), np.int32), j)  # (tiles!,): distance to the set
        for _ in range(n - 1):
            j = int(np.argmax(dmin))  # the chosen ones are at distance 0
            chosen.append(j)
            dmin = np.minimum(dmin, tiles - add_agreements(np.zeros(len(perms), np.int32), j))
    out = perms[chosen].astype(np.int64)
    out.flags.writeable = False
    return out


def permutation_set(n: int, tiles: int = GRID * GRID, seed: int = 0, rule: str = "max_mean") -> np.ndarray:
    """(n, tiles) int64: the permutation set of ``rule`` (``PERMUTATION_RULES``). The first permutation
    is drawn at random (``seed``); each next one is, among all tiles! permutations not yet chosen, the
    first (lexicographic order) with the largest mean (max_mean, the paper's Algorithm 1) or minimum
    (max_min) Hamming distance to those already chosen."""
    return _permutation_set(n, tiles, seed, rule).copy()


def max_hamming_permutations(n: int, tiles: int = GRID * GRID, seed: int = 0) -> np.ndarray:
    """The ``max_min`` set (the rule this project used first)."""
    return permutation_set(n, tiles, seed, "max_min")


def jitter_tiles(tiles: torch.Tensor, shift: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, K, C, t, t) normalised tiles -> the same with each channel of each tile shifted by an integer
    number of grey levels drawn uniformly in [-shift, shift - 1] (``np.random.randint(-2, 2)`` of the
    official ``rgb_jittering``) and clipped to the pixel range [0, 255] (``mean`` / ``std`` (C,): the
    normalisation of the view). A per-channel tile mean subtraction removes the shift where no pixel
    was clipped, as in the official loader."""
    b, k, c = tiles.shape[:3]
    m, s = mean.view(1, 1, c, 1, 1), std.view(1, 1, c, 1, 1)
    levels = torch.randint(-shift, shift, (b, k, c, 1, 1), device=tiles.device)  # (B, K, C, 1, 1)
    pix = (tiles * s + m + levels / 255.0).clamp(0.0, 1.0)  # (B, K, C, t, t) in [0, 1]
    return (pix - m) / s


def normalise_tiles(tiles: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, K, C, t, t) -> each tile normalised on its own: channel_mean, each channel's mean subtracted
    (MehdiNoroozi/JigsawPuzzleSolver@8041c58 caffe-master-jps/src/caffe/data_transformer.cpp: the
    mean_values_ recomputed per tile and channel, scale 1); channel_mean_std, each channel to mean 0 and
    standard deviation 1 (bbrattoli/JigsawPuzzlePytorch@ec85994 Dataset/JigsawImageLoader.py, a 0 std
    left at 1); mean_std, the tile's mean and standard deviation over all channels (+ 1e-5)."""
    if mode == "channel_mean":
        return tiles - tiles.mean((3, 4), keepdim=True)
    if mode == "channel_mean_std":
        sd = tiles.flatten(3).std(3)[..., None, None]  # (B, K, C, 1, 1), unbiased as torch's Tensor.std
        return (tiles - tiles.mean((3, 4), keepdim=True)) / torch.where(sd == 0, torch.ones_like(sd), sd)
    flat = tiles.flatten(2)  # (B, K, C*t*t)
    return ((flat - flat.mean(2, keepdim=True)) / (flat.std(2, keepdim=True) + 1e-5)).view_as(tiles)


def cut_tiles(x: torch.Tensor, tile: int, offsets: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, S, S) views -> (B, K, C, tile, tile): cell (r, c) of the 3 x 3 grid (side S // 3)
    cropped at ``offsets[b, r * 3 + c]`` = (dy, dx) inside the cell; ``cells`` (B, K) picks the cells
    per view (default: all nine, row-major; relative location cuts only its pair)."""
    b, cell = len(x), x.shape[-1] // GRID
    if cells is None:
        cells = torch.arange(GRID * GRID, device=x.device).expand(b, -1)
    steps = torch.arange(tile, device=x.device)
    out = []
    for k in range(cells.shape[1]):
        i = cells[:, k]  # (B,) cell index per view
        dy, dx = offsets[torch.arange(b, device=x.device), i].unbind(1)  # (B,) each
        ys = (i // GRID * cell + dy)[:, None] + steps  # (B, tile)
        xs = (i % GRID * cell + dx)[:, None] + steps  # (B, tile)
        rows = torch.take_along_dim(x, ys[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]), dim=2)
        out.append(torch.take_along_dim(rows, xs[:, None, None, :].expand(-1, x.shape[1], tile, -1), dim=3))
    return torch.stack(out, dim=1)  # (B, K, C, tile, tile)


@dataclass
class JigsawCfg(TrainCfg):
    permutations: int = 1000  # paper: 1000
    # how the permutation set is chosen (PERMUTATION_RULES): max_mean, the paper's Algorithm 1 (largest
    # mean Hamming distance to the chosen set; bbrattoli/JigsawPuzzlePytorch@ec85994 select_permutations.py
    # --selection max); max_min, the largest minimum distance (this project's earlier rule)
    permutation_rule: str = "max_mean"
    view_size: int = 0  # side of the view the grid is cut from (0: the dataset's; official 255)
    tile_size: int = 0  # 0: 64/85 of the cell, the official ratio (64 px tiles in 85 px cells)
    tile_norm: bool = True  # each tile normalised on its own (paper sec. 3.2), as tile_norm_mode says
    # TILE_NORMS: channel_mean, per-channel mean subtraction without scaling (the official Caffe
    # data_transformer.cpp); channel_mean_std, per-channel mean and standard deviation (the PyTorch
    # reimplementation's loader); mean_std, mean and standard deviation over all channels (earlier rule)
    tile_norm_mode: str = "channel_mean"
    # each channel of each tile shifted by an integer in [-tile_jitter, tile_jitter - 1] grey levels
    # (bbrattoli/JigsawPuzzlePytorch@ec85994 Dataset/JigsawImageLoader.py rgb_jittering: randint(-2, 2));
    # 0: none (the Caffe code)
    tile_jitter: int = 2
    # images turned grayscale before the cut (the same loader: 30 %; the Caffe code: none)
    grayscale_p: float = 0.3
    # per-tile fc6 after the backbone, shared by the tiles, ReLU and dropout (train_val_cfn_jps.prototxt
    # fc6_s*: 1024); 0: none, the backbone's feature is the tile's (this project's earlier head)
    tile_fc: int = 1024
    # fc after the concatenated tiles (prototxt fc7: 4096); 0: the tile feature's width
    hidden: int = 0
    head_bn: bool = False  # batch norm after that fc (the paper's CaffeNet fc7 has none)
    dropout: float = 0.5  # after the ReLU of fc6 and of fc7 (prototxt drop6_s*, drop7: 0.5)
    perm_seed: int = 0  # the permutation set's random first permutation

    def check(self, p: str) -> None:
        super().check(p)
        positive(p, self, "permutations")
        non_negative(p, self, "view_size", "tile_size", "hidden", "tile_fc", "tile_jitter")
        one_of(p, "permutation_rule", self.permutation_rule, PERMUTATION_RULES)
        one_of(p, "tile_norm_mode", self.tile_norm_mode, TILE_NORMS)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{p}.dropout: a probability in [0, 1), got {self.dropout}")


@register
class Jigsaw(Method):
    name = "jigsaw"
    Config = JigsawCfg

    def __init__(self, backbone: Any, cfg: JigsawCfg, num_classes: int):
        super().__init__(backbone, cfg, num_classes)
        perms = permutation_set(cfg.permutations, seed=cfg.perm_seed, rule=cfg.permutation_rule)
        self.register_buffer("perms", torch.from_numpy(perms))  # (permutations, 9)
        # the view's normalisation (tile_jitter works in grey levels); set from the data's statistics
        self.register_buffer("pix_mean", torch.zeros(backbone.in_channels), persistent=False)
        self.register_buffer("pix_std", torch.ones(backbone.in_channels), persistent=False)
        d = backbone.out_dim
        act = [nn.ReLU()] if backbone.relu_head else []
        fc6 = [nn.Linear(d, cfg.tile_fc), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout)] if cfg.tile_fc else []
        self.tile_head = nn.Sequential(*act, *fc6)  # (B*9, D) -> (B*9, T), one for every tile
        t = cfg.tile_fc or d
        h = cfg.hidden or t
        # fc7 over the nine concatenated tile features, [BN], ReLU, dropout, the permutation classifier fc8
        self.head = nn.Sequential(nn.Linear(GRID * GRID * t, h, bias=not cfg.head_bn),
                                  *([nn.BatchNorm1d(h)] if cfg.head_bn else []), nn.ReLU(inplace=True),
                                  nn.Dropout(cfg.dropout), nn.Linear(h, cfg.permutations))

    @classmethod
    def from_data(cls, backbone: Any, cfg: JigsawCfg, data: Any) -> "Jigsaw":
        m = cls(backbone, cfg, data.num_classes)
        m.pix_mean.copy_(torch.tensor(data.meta["mean"], dtype=torch.float32))
        m.pix_std.copy_(torch.tensor(data.meta["std"], dtype=torch.float32))
        return m

    def view_specs(self) -> list[ViewSpec]:
        return [dataclasses.replace(view_spec(self.cfg), size=self.cfg.view_size)]

    def tile_size(self, side: int) -> int:
        cell = side // GRID
        t = self.cfg.tile_size or max(1, round(cell * 64 / 85))
        if t > cell:
            raise ConfigError(f"jigsaw.tile_size: {t} exceeds the {cell} px cells of a {side} px view")
        return t

    def forward(self, batch: Batch) -> StepOut:
        c = self.cfg
        x = batch.x  # (B, C, S, S)
        b, side = len(x), x.shape[-1]
        t = self.tile_size(side)
        cell = side // GRID
        # from the global RNG, which the loop seeds per (run seed, epoch, batch): resumable
        offsets = torch.randint(0, cell - t + 1, (b, GRID * GRID, 2), device=x.device)  # (B, 9, 2)
        label = torch.randint(0, len(self.perms), (b,), device=x.device)  # (B,)
        tiles = cut_tiles(x, t, offsets)  # (B, 9, C, t, t)
        if c.tile_jitter:
            tiles = jitter_tiles(tiles, c.tile_jitter, self.pix_mean, self.pix_std)
        tiles = torch.take_along_dim(tiles, self.perms[label][:, :, None, None, None], dim=1)  # shuffled
        if c.tile_norm:
            tiles = normalise_tiles(tiles, c.tile_norm_mode)
        f = self.tile_head(self.backbone(tiles.flatten(0, 1)))  # (B*9, T): one trunk for every tile
        logits = self.head(f.view(b, -1)).float()  # (B, permutations)
        loss = nn.functional.cross_entropy(logits, label)
        return StepOut(loss, {"pretext_acc": (logits.argmax(1) == label).float().mean().detach()})

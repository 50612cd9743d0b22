"""Jigsaw puzzles (Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving
Jigsaw Puzzles", ECCV 2016): cut the view into a 3 x 3 grid of cells, take a tile at a random
position inside each cell (the gaps between tiles keep edges and textures from giving the answer
away, sec. 3.2), shuffle the nine tiles by one of a fixed set of permutations and predict which one.

- The permutation set (``max_hamming_permutations``): the paper's greedy construction, maximal
  minimum Hamming distance (sec. 3.3, its ablation: 1000 permutations, "maximal" average / minimum
  distance): start from a random permutation of the 9! and repeatedly add the one whose distance to
  the chosen set is largest. Size ``permutations`` (paper: 1000).
- Each tile is normalised by its own mean and standard deviation (sec. 3.2: against shortcuts from
  low-level statistics; ``tile_norm``). The official code also jitters colour per tile; here the
  method's colour augmentation acts on the whole view before the cut (a documented difference).
- The context-free network (CFN, sec. 3.1): the backbone applied to every tile with shared weights,
  the nine feature vectors concatenated in the shuffled order, then fc (``hidden``, ReLU) and the
  ``permutations``-way classifier. The evaluated encoder is the backbone alone.
- Official ImageNet settings: images resized to 256, a 225 crop cut into 75 px cells, 64 px tiles,
  AlexNet per tile (fc6 512 per tile, fc7 4096), 1000 permutations, 350k iterations of batch 256,
  lr 0.01 (x0.1 every 100k). Small images (digits 8 px): the view is upsampled to ``view_size``
  first, so the cells hold enough pixels.
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

from selfsup.augment import ViewSpec
from selfsup.config import ConfigError, TrainCfg, non_negative, positive
from selfsup.heads import projection_head
from selfsup.methods import register
from selfsup.methods.base import Batch, Method, StepOut, view_spec

GRID = 3


@functools.lru_cache(maxsize=4)  # the 9! scan takes seconds for the paper's 1000: once per process
def _max_hamming(n: int, tiles: int, seed: int) -> np.ndarray:
    perms = np.array(list(itertools.permutations(range(tiles))), dtype=np.int8)  # (tiles!, tiles)
    if not 0 < n <= len(perms):
        raise ValueError(f"permutations: need 1..{len(perms)}, got {n}")
    first = int(np.random.default_rng(seed).integers(len(perms)))
    chosen = [first]
    dmin = (perms != perms[first]).sum(1)  # (tiles!,): distance to the set so far
    for _ in range(n - 1):
        j = int(np.argmax(dmin))
        chosen.append(j)
        dmin = np.minimum(dmin, (perms != perms[j]).sum(1))
    out = perms[chosen].astype(np.int64)
    out.flags.writeable = False
    return out


def max_hamming_permutations(n: int, tiles: int = GRID * GRID, seed: int = 0) -> np.ndarray:
    """(n, tiles) int64: the paper's greedy maximal-Hamming permutation set. The first permutation is
    drawn at random (``seed``); each next one is, among all tiles! permutations, the first with the
    largest minimum Hamming distance to those already chosen."""
    return _max_hamming(n, tiles, seed).copy()


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
    view_size: int = 0  # side of the view the grid is cut from (0: the dataset's; paper 225)
    tile_size: int = 0  # 0: 64/75 of the cell, the paper's ratio
    tile_norm: bool = True  # each tile normalised by its own mean / std (paper)
    hidden: int = 0  # fc after the concatenated tiles (paper fc7: 4096); 0: the backbone's width
    head_bn: bool = False  # batch norm after that fc (the paper's CaffeNet fc7 has none)
    perm_seed: int = 0  # the permutation set's random first permutation

    def check(self, p: str) -> None:
        super().check(p)
        positive(p, self, "permutations")
        non_negative(p, self, "view_size", "tile_size", "hidden")


@register
class Jigsaw(Method):
    name = "jigsaw"
    Config = JigsawCfg

    def __init__(self, backbone: Any, cfg: JigsawCfg, num_classes: int):
        super().__init__(backbone, cfg, num_classes)
        self.register_buffer("perms", torch.from_numpy(max_hamming_permutations(cfg.permutations, seed=cfg.perm_seed)))
        d = backbone.out_dim
        self.tile_act = nn.Sequential(*([nn.ReLU()] if backbone.relu_head else []))
        # fc over the nine concatenated tile features, ReLU, the permutation classifier
        self.head = projection_head("mlp", GRID * GRID * d, cfg.permutations, cfg.hidden or d, bn=cfg.head_bn)

    def view_specs(self) -> list[ViewSpec]:
        return [dataclasses.replace(view_spec(self.cfg), size=self.cfg.view_size)]

    def tile_size(self, side: int) -> int:
        cell = side // GRID
        t = self.cfg.tile_size or max(1, round(cell * 64 / 75))
        if t > cell:
            raise ConfigError(f"jigsaw.tile_size: {t} exceeds the {cell} px cells of a {side} px view")
        return t

    def forward(self, batch: Batch) -> StepOut:
        x = batch.x  # (B, C, S, S)
        b, side = len(x), x.shape[-1]
        t = self.tile_size(side)
        cell = side // GRID
        # from the global RNG, which the loop seeds per (run seed, epoch, batch): resumable
        offsets = torch.randint(0, cell - t + 1, (b, GRID * GRID, 2), device=x.device)  # (B, 9, 2)
        label = torch.randint(0, len(self.perms), (b,), device=x.device)  # (B,)
        tiles = cut_tiles(x, t, offsets)  # (B, 9, C, t, t)
        tiles = torch.take_along_dim(tiles, self.perms[label][:, :, None, None, None], dim=1)  # shuffled
        if self.cfg.tile_norm:
            flat = tiles.flatten(2)  # (B, 9, C*t*t)
            tiles = ((flat - flat.mean(2, keepdim=True)) / (flat.std(2, keepdim=True) + 1e-5)).view_as(tiles)
        f = self.tile_act(self.backbone(tiles.flatten(0, 1)))  # (B*9, D): one trunk for every tile
        logits = self.head(f.view(b, -1)).float()  # (B, permutations)
        loss = nn.functional.cross_entropy(logits, label)
        return StepOut(loss, {"pretext_acc": (logits.argmax(1) == label).float().mean().detach()})

"""CPC's autoregressive context network over a grid of patch embeddings (Hénaff et al. 2020, appendix
pseudocode ``pixelCNN``; van den Oord et al. 2018 sec. 3.3 use a PixelCNN-style network too).

``blocks`` residual blocks, each: 1x1 conv to ``width``, ReLU, a 1x3 conv along the row (zero padding
left and right), the map shifted down one row (a zero row on top) and a 2x1 conv over that row and the
one above it (no padding), ReLU, a 1x1 conv back to the embedding's channels; the block's output is
added to its input. A ReLU at the end.

Masking: every operation but the 2x1 conv stays within a row, and that one reads row i and row i - 1
only, so the context at row i depends on the embeddings of rows <= i (``blocks`` rows up, and
``blocks`` columns to each side); it never sees a row below it, which CPC then predicts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, dim: int, width: int):
        super().__init__()
        self.reduce = nn.Conv2d(dim, width, 1)
        self.row = nn.Conv2d(width, width, (1, 3), padding=(0, 1))
        self.up = nn.Conv2d(width, width, (2, 1))  # rows i - 1 and i -> row i (after the one-row shift)
        self.expand = nn.Conv2d(width, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D, H, W) -> (B, D, H, W)
        c = self.row(F.relu(self.reduce(x)))  # (B, width, H, W)
        c = F.relu(self.up(F.pad(c, (0, 0, 1, 0))))  # a zero row on top: (B, width, H + 1, W) -> (B, width, H, W)
        return x + self.expand(c)


class MaskedContext(nn.Module):
    """(B, D, H, W) patch embeddings -> (B, D, H, W) contexts, row i seeing rows <= i only."""

    def __init__(self, dim: int, width: int = 256, blocks: int = 5):
        super().__init__()
        self.blocks = nn.Sequential(*(_Block(dim, width) for _ in range(blocks)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.relu(self.blocks(z))

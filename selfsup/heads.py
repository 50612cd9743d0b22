"""Projection heads shared by the instance-discrimination methods (and reusable by any).

- ``linear``: one ``Linear(in, out)`` (InstDisc's 128-d embedding layer, MoCo v1).
- ``mlp``: ``Linear(in, hidden) -> [BN] -> ReLU -> Linear(hidden, out)`` (SimCLR's g(.),
  MoCo v2's head; MoCo v2's official code has no BN in the head, SimCLR's has BN,
  hence the ``bn`` switch).

``embed(x)`` L2-normalises the output, as every method of the family compares
embeddings on the unit sphere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("linear", "mlp")


def projection_head(kind: str, in_dim: int, out_dim: int, hidden_dim: int = 0, bn: bool = False) -> nn.Module:
    """A projection head ``in_dim -> out_dim``; ``hidden_dim`` 0 means ``in_dim`` (SimCLR, MoCo v2)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        hidden = hidden_dim or in_dim
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden, bias=not bn)]
        if bn:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown projection head {kind!r}; choose one of {', '.join(HEADS)}")


def l2n(x: torch.Tensor) -> torch.Tensor:
    """Rows of (B, D) scaled to unit L2 norm."""
    return F.normalize(x, dim=1)

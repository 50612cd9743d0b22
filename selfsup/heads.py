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


def mlp(dims: list[int], last_bn: str = "none") -> nn.Sequential:
    """Linear layers ``dims[0] -> dims[1] -> ... -> dims[-1]``, each hidden one followed by BN and
    ReLU (no bias before a BN); ``last_bn``: none | affine | no_affine, a BN on the output (SimSiam's
    projector ends in a BN without affine parameters, official ``simsiam/builder.py``)."""
    if len(dims) < 2:
        raise ValueError(f"mlp: need at least an input and an output size, got {dims}")
    if last_bn not in ("none", "affine", "no_affine"):
        raise ValueError(f"mlp: last_bn is none, affine or no_affine, got {last_bn!r}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        bn = not last or last_bn != "none"
        layers.append(nn.Linear(a, b, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm1d(b, affine=not (last and last_bn == "no_affine")))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def l2n(x: torch.Tensor) -> torch.Tensor:
    """Rows of (B, D) scaled to unit L2 norm."""
    return F.normalize(x, dim=1)


class EvalHead(nn.Module):
    """The features a method's own paper evaluates with, computed from the backbone output:
    ``[ReLU] -> [projection head] -> [L2 norm]``. InstDisc, InvaSpread and the MoCo CIFAR demo
    run their kNN on the L2-normalised 128-d head output (lemniscate ``test.py``, InvaSpread's
    ``utils.kNN``, the demo's ``test()``); SeLa on post-ReLU fc7. ``spec`` (JSON) rebuilds it with
    no method code, so ``data/models/<m>.pt`` carries it (``selfsup.models.save_backbone``)."""

    def __init__(self, spec: dict, proj: nn.Module | None = None):
        super().__init__()
        self.spec = dict(spec)
        p = spec.get("proj")
        if proj is None and p is not None:
            proj = projection_head(p["kind"], p["in_dim"], p["out_dim"], p.get("hidden_dim", 0), p.get("bn", False))
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, D')
        if self.spec.get("relu"):
            x = F.relu(x)
        if self.proj is not None:
            x = self.proj(x)
        return l2n(x) if self.spec.get("l2") else x


def proj_spec(kind: str, in_dim: int, out_dim: int, hidden_dim: int = 0, bn: bool = False) -> dict:
    """The JSON description of ``projection_head(kind, in_dim, out_dim, hidden_dim, bn)``."""
    return {"kind": kind, "in_dim": in_dim, "out_dim": out_dim, "hidden_dim": hidden_dim, "bn": bn}

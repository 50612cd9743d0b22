"""Projection heads shared by the instance-discrimination methods (and reusable by any).

- ``linear``: one ``Linear(in, out)`` (InstDisc's 128-d embedding layer, MoCo v1).
- ``mlp``: ``Linear(in, hidden) -> [BN] -> ReLU -> Linear(hidden, out)`` (SimCLR's g(.),
  MoCo v2's head; MoCo v2's official code has no BN in the head, SimCLR's has BN,
  hence the ``bn`` switch).

``embed(x)`` L2-normalises the output, as every method of the family compares
embeddings on the unit sphere.

``DINOHead`` (DINO's MLP + L2 norm + weight-normalised last layer) and its ``WeightNormLinear``
serve the self-distillation methods.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("linear", "mlp")


def projection_head(kind: str, in_dim: int, out_dim: int, hidden_dim: int = 0, bn: bool = False,
                    layers: int = 2, hidden_bias: bool | None = None, out_bias: bool = True) -> nn.Module:
    """A projection head ``in_dim -> out_dim``; ``hidden_dim`` 0 means ``in_dim`` (SimCLR, MoCo v2);
    ``layers``: the mlp's Linear layers (2: SimCLR v1 / MoCo v2; 3: SimCLR v2's deeper head, sec. 2).
    ``hidden_bias``: whether the mlp's hidden Linear layers have a bias (None: only without BN, which
    would remove it); ``out_bias``: whether the output Linear has one. BYOL's official MLP
    (deepmind-research ``byol/utils/networks.py``) has the bias on the first Linear, before its BN,
    and none on the last: ``hidden_bias=True, out_bias=False``."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        if layers < 2:
            raise ValueError(f"projection_head: an mlp has at least 2 layers, got {layers}")
        hidden = hidden_dim or in_dim
        mods: list[nn.Module] = []
        for a in [in_dim] + [hidden] * (layers - 2):  # each hidden layer: Linear -> [BN] -> ReLU
            mods.append(nn.Linear(a, hidden, bias=(not bn) if hidden_bias is None else hidden_bias))
            if bn:
                mods.append(nn.BatchNorm1d(hidden))
            mods.append(nn.ReLU(inplace=True))
        mods.append(nn.Linear(hidden, out_dim, bias=out_bias))
        return nn.Sequential(*mods)
    raise ValueError(f"unknown projection head {kind!r}; choose one of {', '.join(HEADS)}")


def hidden_layers(proj: nn.Module, k: int, what: str = "head") -> tuple[nn.Sequential, int]:
    """(the first ``k`` hidden layers of an ``mlp`` projection head, Linear -> [BN] -> ReLU each, as a
    new module; their output width): what SimCLR v2 fine-tunes with the backbone (sec. 2; the official
    ``ft_proj_selector`` picks ``hiddens_list[k]``, the output of the k-th hidden layer)."""
    mods = list(proj.children()) if isinstance(proj, nn.Sequential) else []
    relus = [i for i, m in enumerate(mods) if isinstance(m, nn.ReLU)]
    if not 1 <= k <= len(relus):
        raise ValueError(f"{what}: the saved projection head has {len(relus)} hidden layers, asked for {k} (at least 1)")
    kept = copy.deepcopy(nn.Sequential(*mods[:relus[k - 1] + 1]))
    width = [m.out_features for m in kept if isinstance(m, nn.Linear)][-1]
    return kept, width


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
    no method code, so ``data/models/<m>.pt`` carries it (``selfsup.models.backbones.save_backbone``)."""

    def __init__(self, spec: dict, proj: nn.Module | None = None):
        super().__init__()
        self.spec = dict(spec)
        p = spec.get("proj")
        if proj is None and p is not None:
            proj = projection_head(p["kind"], p["in_dim"], p["out_dim"], p.get("hidden_dim", 0), p.get("bn", False),
                                   p.get("layers", 2))
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, D')
        if self.spec.get("relu"):
            x = F.relu(x)
        if self.proj is not None:
            x = self.proj(x)
        return l2n(x) if self.spec.get("l2") else x


def proj_spec(kind: str, in_dim: int, out_dim: int, hidden_dim: int = 0, bn: bool = False, layers: int = 2) -> dict:
    """The JSON description of ``projection_head(kind, in_dim, out_dim, hidden_dim, bn, layers)``."""
    spec = {"kind": kind, "in_dim": in_dim, "out_dim": out_dim, "hidden_dim": hidden_dim, "bn": bn}
    return spec if layers == 2 else {**spec, "layers": layers}  # 2: as files written before the key


class WeightNormLinear(nn.Module):
    """A bias-free ``Linear(in_dim, out_dim)`` with weight normalisation (Salimans & Kingma 2016) over
    its rows, w = g v / ||v|| (what ``torch.nn.utils.weight_norm(..., dim=0)`` computes): ``weight_v``
    keeps nn.Linear's init, the norms ``weight_g`` start at 1 and, with ``fixed_norm``, stay there
    (not trained: DINO's ``norm_last_layer``). Written out so the parameters are plain ones that
    copy, average and checkpoint like any other."""

    def __init__(self, in_dim: int, out_dim: int, fixed_norm: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())  # (out, in)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fixed_norm)  # (out, 1)

    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        return F.linear(x, self.weight())


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, sec. 3 / appendix; the official ``DINOHead``): an MLP of
    ``layers`` Linear layers (``in_dim -> hidden_dim ... -> bottleneck_dim``, GELU between them, optional
    BN after each hidden one), L2 normalisation, then a weight-normalised bias-free Linear to ``out_dim``
    (``last_layer``; its row norms fixed to 1 with ``norm_last_layer``). The MLP's Linear layers start
    from a truncated normal of std 0.02 with zero biases; the last layer keeps nn.Linear's init."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(layers, 1) - 1) + [bottleneck_dim]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            mods.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                if bn:
                    mods.append(nn.BatchNorm1d(b))
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, in_dim) -> (N, out_dim)
        return self.last_layer(l2n(self.mlp(x)))

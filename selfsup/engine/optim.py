"""Optimisers over the parameter groups a method defines: ``sgd | lars | adamw``.

Each group may carry its own ``weight_decay``, ``lr_scale`` (the schedule's lr times it) and
``lars_exclude`` (no LARS trust ratio). ``param_groups`` builds the common split: no weight decay
on biases and normalisation weights (``exclude_norm_bias``, as SimCLR's LARS, BYOL and DINO), and
the biases of conv / linear layers at ``bias_lr_mult`` x the lr (Caffe's ``lr_mult: 2``).

LARS (You et al. 2017) is written here: torch has none. It follows SimCLR's official
``LARSOptimizer`` (google-research/simclr, lars_optimizer.py): d = g + wd * w, scaled per
parameter tensor by the trust ratio ``eta * ||w|| / ||d||`` (1 where either norm is 0; excluded
tensors, biases and BN, which also get no weight decay, skip it); the momentum buffer holds the
lr-scaled step, v <- m v + lr * trust * d, w <- w - v (the learning rate inside the buffer, as
the official code, not outside as torch's SGD). ``rule="larc"`` is NVIDIA apex's LARC with
``clip=False`` (apex/parallel/LARC.py, which SwAV's and SimSiam's code wrap around SGD): the trust
ratio is ``eta * ||w|| / (||g|| + wd * ||w|| + 1e-8)`` on the raw gradient, then d = trust * (g + wd * w)
goes through torch's SGD momentum (the lr outside the buffer).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn


def param_groups(module: nn.Module, weight_decay: float, exclude_norm_bias: bool,
                 params: Iterable[nn.Parameter] | None = None,
                 bias_lr_mult: float = 1.0) -> list[dict[str, Any]]:
    """[decayed, not decayed] groups of ``module``'s trainable parameters (``params``: a subset).

    Biases and the parameters of normalisation layers (1-d tensors) go to the second group when
    ``exclude_norm_bias``; it gets weight decay 0 and ``lars_exclude``. With ``bias_lr_mult`` != 1
    the biases of conv and linear layers form groups of their own with ``lr_scale`` bias_lr_mult
    (Caffe's ``lr_mult: 2``; their weight decay as the group they came from)."""
    keep = None if params is None else {id(p) for p in params}
    lin_bias = set()
    if bias_lr_mult != 1.0:
        lin_bias = {id(m.bias) for m in module.modules()
                    if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)) and m.bias is not None}
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in module.parameters():
        if not p.requires_grad or (keep is not None and id(p) not in keep):
            continue
        key = (exclude_norm_bias and p.ndim <= 1, id(p) in lin_bias)
        buckets.setdefault(key, []).append(p)
    groups = []
    for (no_decay, is_bias), ps in sorted(buckets.items()):
        g: dict[str, Any] = {"params": ps, "weight_decay": 0.0 if no_decay else weight_decay}
        if no_decay:
            g["lars_exclude"] = True
        if is_bias:
            g["lr_scale"] = bias_lr_mult
        groups.append(g)
    return groups


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with momentum (SimCLR's LARSOptimizer)."""

    def __init__(self, params: Any, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, rule: str = "simclr"):
        if rule not in ("simclr", "larc"):
            raise ValueError(f"LARS rule: unknown {rule!r} (simclr | larc)")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=False, rule=rule))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                if g["rule"] == "larc":
                    self._larc_step(p, g)
                    continue
                d = p.grad
                if g["weight_decay"]:
                    d = d.add(p, alpha=g["weight_decay"])
                if not g["lars_exclude"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), g["eta"] * w_norm / d_norm,
                                        torch.ones_like(w_norm))
                    d = d * trust
                st = self.state[p]
                if "momentum_buffer" not in st:  # official: zero-initialised slot
                    st["momentum_buffer"] = torch.zeros_like(p)
                v = st["momentum_buffer"]
                v.mul_(g["momentum"]).add_(d, alpha=g["lr"])
                p.sub_(v)
        return loss


    def _larc_step(self, p: nn.Parameter, g: dict[str, Any]) -> None:
        """apex LARC (clip=False) then torch SGD: the trust ratio from the raw gradient's norm
        (weight decay added inside the ratio, ``||g|| + wd ||w||``, 1 where either norm is 0), the
        decayed gradient scaled by it, torch's momentum buffer (first step: the step itself)."""
        d = p.grad
        wd = g["weight_decay"]
        if not g["lars_exclude"]:
            # apex: a tensor with a zero weight or gradient norm keeps its raw gradient (no decay)
            w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
            ok = (w_norm > 0) & (g_norm > 0)
            trust = torch.where(ok, g["eta"] * w_norm / (g_norm + wd * w_norm + 1e-8), torch.ones_like(w_norm))
            d = (d + ok.to(d.dtype) * wd * p) * trust
        elif wd:
            d = d.add(p, alpha=wd)
        st = self.state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = d.clone()
        else:
            st["momentum_buffer"].mul_(g["momentum"]).add_(d)
        p.sub_(st["momentum_buffer"], alpha=g["lr"])


def build_optimizer(groups: list[dict[str, Any]], c: Any) -> torch.optim.Optimizer:
    """The optimiser of a method config (``TrainCfg``) over ``groups``; every group's lr is set by
    the loop each step (schedule x the group's ``lr_scale``)."""
    for g in groups:
        g.setdefault("weight_decay", c.weight_decay)
        g.setdefault("lr_scale", 1.0)
    if c.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                               weight_decay=c.weight_decay)
    if c.optimizer == "lars":
        return LARS(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, eta=c.lars_eta,
                    rule=getattr(c, "lars_rule", "simclr"))
    if c.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)
    if c.optimizer == "adam":  # L2 in the gradient (Caffe's Adam solver with weight_decay)
        return torch.optim.Adam(groups, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)
    raise ValueError(f"optimizer: unknown {c.optimizer!r}")


@torch.no_grad()
def clip_grad_per_param(params: Iterable[nn.Parameter], clip: float) -> None:
    """Each parameter's gradient clipped to L2 norm ``clip`` on its own (DINO's
    ``utils.clip_gradients``, facebookresearch/dino utils.py: coef = clip / (||g|| + 1e-6), applied
    when < 1), not the global norm of ``torch.nn.utils.clip_grad_norm_``. The coefficient is
    clamped at 1 on the device instead of the official ``if clip_coef < 1`` (no host sync per
    tensor); x 1.0 leaves a gradient bit-identical, so the result is the same."""
    for p in params:
        if p.grad is None:
            continue
        norm = torch.linalg.vector_norm(p.grad.float())  # ()
        p.grad.mul_((clip / (norm + 1e-6)).clamp(max=1.0).to(p.grad.dtype))

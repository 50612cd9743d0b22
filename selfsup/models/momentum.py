"""Momentum-encoder parts (MoCo; reusable by any method with a key encoder / queue).

- ``ema_update``: the momentum update of MoCo sec. 3.2, Eq. 2:
  theta_k <- m theta_k + (1 - m) theta_q, on parameters only (the official
  ``_momentum_update_key_encoder``; batch-norm running statistics of the key encoder
  are its own, from its own forward passes).
- ``MomentumTarget``: the momentum twin of BYOL (target network), MoCo v3 (momentum encoder) and
  DINO (teacher): frozen copies of online modules that follow them by ``ema_update`` after each
  optimiser step, with the momentum constant or on BYOL's cosine (``cosine_momentum``) and the step
  counter a buffer, so a resumed run continues the schedule.
- ``KeyQueue``: the dictionary as a FIFO of the K most recent keys (sec. 3.2),
  registered buffers (keys and write pointer) so that checkpoints carry it. The
  official code requires K % batch == 0 and overwrites ``[ptr, ptr + B)``; this one
  wraps around, so a last short batch of an epoch is enqueued too (same FIFO).
- ``SplitBatchNorm`` / ``split_batch_norm``: MoCo's Shuffle-BN needs several
  devices; on one device the official CIFAR demo (facebookresearch/moco, colab
  notebook) emulates ``num_splits`` devices with a BN whose training-mode statistics
  are computed per sub-batch, running statistics averaged over the sub-batches; in
  eval mode it is plain BN. Combined with a random permutation of the key batch
  (``shuffled``, the demo's ``_batch_shuffle_single_gpu``), query and key sub-batches
  see different statistics, which is what Shuffle-BN is for (sec. 3.3).
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def cosine_momentum(base: float, k: int, total: int) -> float:
    """BYOL's target decay (sec. 3.2): tau_k = 1 - (1 - base) (cos(pi k / K) + 1) / 2 at optimiser step
    k of K, from ``base`` at k = 0 to 1 at k = K (constant ``base`` if K is 0)."""
    if total <= 0:
        return base
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(k, total) / total) + 1.0) / 2.0


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that the optimiser never updates (an EMA target / teacher / momentum encoder:
    same init as the online network, as the official codes copy it)."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, m: float) -> None:
    """target.params <- m * target.params + (1 - m) * online.params (in place, no grad)."""
    for pt, po in zip(target.parameters(), online.parameters(), strict=True):
        pt.mul_(m).add_(po.detach(), alpha=1.0 - m)


class MomentumTarget(nn.Module):
    """Frozen copies (``copies[name]``) of the owner's online modules, updated by EMA after each
    optimiser step (``update``). ``momentum()`` is ``base`` (``schedule`` "constant") or the cosine
    from ``base`` to 1 over ``total_steps`` (set by the owner from the loop's context) at the step
    counter + ``offset`` (MoCo v3: 1, the official m(i) of the next iteration; BYOL and DINO: 0).
    The online modules are referenced, not registered: they stay the owner's parameters."""

    def __init__(self, online: dict[str, nn.Module], base: float, schedule: str = "cosine", offset: int = 0):
        super().__init__()
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"momentum schedule: cosine | constant, got {schedule!r}")
        self.copies = nn.ModuleDict({k: frozen_copy(m) for k, m in online.items()})
        self._online = list(online.values())  # plain list: not submodules of the twin
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # optimiser steps taken
        self.base, self.schedule, self.offset = base, schedule, offset
        self.total_steps = 0

    def __getitem__(self, name: str) -> nn.Module:
        return self.copies[name]

    def momentum(self) -> float:
        if self.schedule == "constant":
            return self.base
        return cosine_momentum(self.base, int(self.step) + self.offset, self.total_steps)

    @torch.no_grad()
    def update(self) -> None:
        """The online modules changed (an optimiser step): every copy follows with this step's momentum."""
        m = self.momentum()
        for target, online in zip(self.copies.values(), self._online, strict=True):
            ema_update(target, online, m)
        self.step += 1


class KeyQueue(nn.Module):
    """FIFO of ``size`` keys of dimension ``dim``; starts as random unit vectors (official init)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # (K, D)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next row to overwrite

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, k: torch.Tensor) -> None:
        """Append (B, D) keys, dropping the oldest: after it, the last B rows written are ``k``."""
        k = k.detach()[-self.size:]  # more keys than the queue holds: only the newest fit
        b = len(k)
        rows = (torch.arange(b, device=self.ptr.device) + self.ptr) % self.size  # on the device: no host sync
        self.keys[rows] = k.to(self.keys.dtype)
        self.ptr.copy_((self.ptr + b) % self.size)


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are per sub-batch (``num_splits`` of them)."""

    def __init__(self, num_features: int, num_splits: int, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        chunks = torch.tensor_split(x, min(self.num_splits, len(x)))  # unequal sizes allowed (last batch)
        track = self.running_mean is not None
        # momentum None (cumulative average) as nn.BatchNorm2d: 1 / batches seen
        momentum = self.momentum if self.momentum is not None or not track else \
            1.0 / float(self.num_batches_tracked + 1)
        outs, means, vars_ = [], [], []
        for c in chunks:
            rm = self.running_mean.clone() if track else None
            rv = self.running_var.clone() if track else None
            outs.append(F.batch_norm(c, rm, rv, self.weight, self.bias, True, momentum or 0.0, self.eps))
            means.append(rm)
            vars_.append(rv)
        if track:
            with torch.no_grad():  # as the demo: the running statistics are the mean over splits
                self.running_mean.copy_(torch.stack(means).mean(0))
                self.running_var.copy_(torch.stack(vars_).mean(0))
                self.num_batches_tracked.add_(1)
        return torch.cat(outs)


def split_batch_norm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d of ``module`` (in place) by a SplitBatchNorm with the same
    weights and statistics; state_dict keys are unchanged, so a plain model loads them."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sbn = SplitBatchNorm(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                                 affine=child.affine, track_running_stats=child.track_running_stats)
            state = child.state_dict()
            sbn.load_state_dict(state)
            if state:
                sbn = sbn.to(next(iter(state.values())).device)
            setattr(module, name, sbn)
        else:
            split_batch_norm(child, num_splits)
    return module


def shuffled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn(x) computed on a random permutation of the batch, returned in the original order
    (one-device Shuffle-BN; the permutation draws from torch's seeded global RNG)."""
    perm = torch.randperm(len(x), device=x.device)
    out = fn(x[perm])
    return out[torch.argsort(perm)]

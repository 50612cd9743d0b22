"""What SwAV and DeepCluster-v2 share (Caron et al., NeurIPS 2020; official code
facebookresearch/swav, ``main_swav.py`` / ``main_deepclusterv2.py`` / ``src/resnet50.py``), and the
multi-crop forward they share with DINO.

- ``MultiCropCfg``: the multi-crop views (sec. 3.2: ``n_large`` crops at the dataset's size and
  scale ``crop_scale``, ``n_small`` crops of side ``small_size`` and scale ``small_scale``; official
  ``--nmb_crops 2 6 --size_crops 224 96 --min_scale_crops 0.14 0.05 --max_scale_crops 1. 0.14``),
  the projection head and prototype sizes, the temperature, the crops the codes / memory come
  from (``crops_for_assign``) and the prototype freeze.
- ``multicrop_specs``: the ``ViewSpec`` list of those views (large first, then small: the order of
  the official ``MultiCropDataset``).
- ``multi_crop``: the official multi-resolution forward (SwAV's ``ResNet.forward``, DINO's
  ``MultiCropWrapper``): consecutive views of one resolution go through the network as one
  concatenated batch (so batch norm sees all the crops of that resolution together).
- ``embed_crops``: ``multi_crop`` of the backbone, then the projection head once on every crop's
  features, then the L2 normalisation. Output rows are crop-major: rows [v B, (v + 1) B) are crop v.
- ``PrototypeFreeze``: the official "cancel the prototypes' gradients during the first
  ``freeze_prototypes_niters`` iterations". The official loop sets ``p.grad = None`` between
  backward and the optimiser step; our loop (``selfsup/engine/loop.py``) gives a method no hook there
  (and DDP needs every parameter to get a gradient), so the prototypes get their gradient as usual
  and, after a frozen optimiser step, are put back to their value before it and their optimiser state
  is dropped (``TrainContext.reset_optimizer_state``). That is the same as a step that skipped them:
  torch's SGD / AdamW and our LARS skip a parameter whose ``grad`` is None, keeping no state for it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.augment.batched import ViewSpec
from selfsup.core.config import ConfigError, TrainCfg, non_negative, positive
from selfsup.augment.batched import view_spec


@dataclass
class MultiCropCfg(TrainCfg):
    """Keys SwAV and DeepCluster-v2 share; defaults: the official ImageNet scripts."""

    augment: str = "crop_flip"
    crop_scale: list[float] = field(default_factory=lambda: [0.14, 1.0])  # the large crops (official 0.14-1)
    jitter: list[float] = field(default_factory=lambda: [0.8, 0.8, 0.8, 0.2])  # official get_color_distortion(s=1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5  # official PILRandomGaussianBlur(p=0.5, radius 0.1-2)
    n_large: int = 2  # official nmb_crops[0]
    n_small: int = 6  # official nmb_crops[1]
    small_size: int = 96  # official size_crops[1] (the large crops: the dataset's size, 224)
    small_scale: list[float] = field(default_factory=lambda: [0.05, 0.14])
    proj_hidden: int = 2048  # official hidden_mlp
    feat_dim: int = 128  # official feat_dim
    temperature: float = 0.1
    crops_for_assign: list[int] = field(default_factory=lambda: [0, 1])
    freeze_prototypes_iters: int = 313  # optimiser steps (official freeze_prototypes_niters)

    def check(self, p: str) -> None:
        super().check(p)
        positive(p, self, "n_large", "small_size", "proj_hidden", "feat_dim", "temperature")
        non_negative(p, self, "n_small", "freeze_prototypes_iters")
        lo_hi = self.small_scale
        if len(lo_hi) != 2 or not 0.0 < lo_hi[0] <= lo_hi[1] <= 1.0:
            raise ConfigError(f"{p}.small_scale: need [lo, hi] with 0 < lo <= hi <= 1, got {lo_hi}")
        a = self.crops_for_assign
        if not a or len(set(a)) != len(a) or any(not 0 <= c < self.n_large for c in a):
            raise ConfigError(f"{p}.crops_for_assign: distinct indices of the large crops (0..{self.n_large - 1}), "
                              f"got {a}")

    @property
    def n_crops(self) -> int:
        return self.n_large + self.n_small


def multicrop_specs(c: MultiCropCfg) -> list[ViewSpec]:
    """``n_large`` views of the dataset's size (``crop_scale``), then ``n_small`` of side
    ``small_size`` (``small_scale``); the same colour pipeline for all (official)."""
    large = view_spec(c, c.n_large)
    if not c.n_small:
        return [large]
    return [large, dataclasses.replace(large, count=c.n_small, size=c.small_size, scale=tuple(c.small_scale))]


def multi_crop(net: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """``net`` on every view, consecutive views of one size as one batch; views: V tensors
    (B, C, S_v, S_v) -> (V B, D) in view order (crop-major)."""
    out, i = [], 0
    while i < len(views):
        j = i + 1
        while j < len(views) and views[j].shape[-2:] == views[i].shape[-2:]:
            j += 1
        out.append(net(torch.cat(views[i:j]) if j - i > 1 else views[i]))  # (n B, D)
        i = j
    return torch.cat(out)


def embed_crops(backbone: nn.Module, head: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """views: V tensors (B, C, S_v, S_v) -> (V B, feat_dim) float32 L2-normalised embeddings,
    crop-major. Runs of views with one resolution share a backbone pass (official)."""
    z = head(multi_crop(backbone, views))  # (V B, feat_dim)
    return F.normalize(z.float(), dim=1)


@torch.no_grad()
def normalise_rows_(layer: nn.Linear) -> None:
    """Each prototype (a row of the bias-free linear's weight, (K, D)) scaled to unit L2 norm."""
    layer.weight.copy_(F.normalize(layer.weight, dim=1))


class PrototypeFreeze:
    """Holds the prototypes at their value for the first ``iters`` optimiser steps (module docstring).

    ``before_step()`` in the forward (every batch; the weights do not change between the batches of
    an accumulation group), ``after_step(done)`` after an optimiser step with ``done`` the number of
    optimiser steps before it: True when it put the prototypes back (the step was a frozen one)."""

    def __init__(self, layers: list[nn.Linear], iters: int):
        self.layers, self.iters = layers, iters
        self.saved: list[torch.Tensor] | None = None
        self.reset: Callable[[list[nn.Parameter]], None] | None = None  # ctx.reset_optimizer_state

    def before_step(self, done: int) -> None:
        self.saved = [lay.weight.detach().clone() for lay in self.layers] if done < self.iters else None

    @torch.no_grad()
    def after_step(self, done: int) -> bool:
        if done >= self.iters or self.saved is None:
            return False
        for lay, w in zip(self.layers, self.saved):
            lay.weight.copy_(w)
        if self.reset is not None:
            self.reset([lay.weight for lay in self.layers])
        self.saved = None
        return True


def state_int(module: nn.Module, name: str) -> int:
    """A 0-d long buffer's value on the host (read once, at construction and after a load, so that
    training steps keep a host copy and never sync the device for it)."""
    return int(getattr(module, name).item())


__all__ = ["MultiCropCfg", "PrototypeFreeze", "embed_crops", "multicrop_specs", "normalise_rows_", "state_int"]

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
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.augment.batched import ViewSpec
from selfsup.augment.batched import view_spec


def multicrop_specs(c: Any) -> list[ViewSpec]:
    """The views of a ``selfsup.engine.config.MultiCropCfg``: ``n_large`` views of the dataset's size (``crop_scale``), then ``n_small`` of side
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


__all__ = ["PrototypeFreeze", "embed_crops", "multicrop_specs", "normalise_rows_", "state_int"]

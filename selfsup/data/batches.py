"""Training batches: a loader batch turned into the views a method declared, augmented on the device.

``batch_maker`` is shared by the training loop, the passes a method makes over the whole training
set (SeLa's re-labelling, MLCD's features), the tokenizer and the augmented evaluation protocols.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from selfsup.augment.batched import ViewSpec, augment, make_views
from selfsup.core import dist
from selfsup.core.config import Config
from selfsup.core.io import derive_seed
from selfsup.data.loader import TrainLoader
from selfsup.data.prepared import Data, FileSplit


@dataclass
class Batch:
    views: list[torch.Tensor]  # the declared views in order, each float (B, C, S, S), normalised, on the device
    y: torch.Tensor  # (B,) long labels, -1 where unlabelled
    idx: torch.Tensor  # (B,) long indices into the training split

    @property
    def x(self) -> torch.Tensor:
        return self.views[0]


def train_image_size(cfg: Config, data: Data) -> int:
    """The side of a default view: native for arrays, ``dataset.crop_size`` for image files."""
    return min(data.fixed_size) if data.fixed_size else cfg.dataset.crop_size


def resolve_specs(specs: list[ViewSpec], size: int) -> list[ViewSpec]:
    """Views with size 0 take ``size`` (the dataset's view side)."""
    return [s if s.size else dataclasses.replace(s, size=size) for s in specs]


class ViewMaker:
    """Loader batch -> the declared views on the device, augmented batched with per-sample draws
    from a generator seeded per step."""

    def __init__(self, specs: list[ViewSpec], data: Data, device: torch.device, channels_last: bool):
        self.specs, self.device, self.channels_last = specs, device, channels_last
        self.mean, self.std = data.meta["mean"], data.meta["std"]
        self.files = isinstance(data.train, FileSplit)
        # image files: the workers took each view's crop from the original; the device does the rest
        self.flat = [dataclasses.replace(s, count=1, crop=False) for s in specs for _ in range(s.count)]

    def crops(self) -> list[ViewSpec]:
        return [dataclasses.replace(s, count=1) for s in self.specs for _ in range(s.count)]

    def __call__(self, x: Any, y: torch.Tensor, idx: torch.Tensor, seed: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        if self.files:
            views = [augment(v.to(self.device, non_blocking=True), s, g, self.mean, self.std)
                     for v, s in zip(x, self.flat)]
        else:
            views = make_views(x.to(self.device, non_blocking=True), self.specs, g, self.mean, self.std)
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return Batch(views, y.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True))


def batch_maker(cfg: Config, data: Data, device: torch.device) -> Callable[..., Iterator[Batch]]:
    """``make(specs, seed, batch_size)``: the whole training split once in a shuffled order (seeded),
    with the augmentations of ``specs`` (``TrainContext.augmented_batches``: SeLa's re-labelling
    pass, as the official code runs it on the training loader). Several processes: each rank takes
    its contiguous share of the shuffled order, so every sample is seen once."""
    size = train_image_size(cfg, data)
    per_rank = (dist.rank(),) if dist.world() > 1 else ()

    def make(specs: list[ViewSpec], seed: int, batch_size: int) -> Iterator[Batch]:
        vm = ViewMaker(resolve_specs(specs, size), data, device, cfg.channels_last)
        ld = TrainLoader(data.train, batch_size, False, cfg.workers, vm.crops())
        order = np.random.default_rng(seed).permutation(data.n_train)[dist.shard(data.n_train)]
        for b, (x, y, idx) in enumerate(ld.epoch(order, seed)):
            yield vm(x, y, idx, derive_seed(seed, "views", b, *per_rank))

    return make

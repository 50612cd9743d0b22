"""Batches of uint8 images from a prepared split, for training and for feature extraction.

Training (``TrainLoader``): one DataLoader for the whole run (persistent workers, pinned memory
on a GPU). Each epoch it is given the epoch's sample order (a seeded permutation, or the one a
method plans, e.g. DeepCluster's uniform-over-clusters draw) and the step to start from, so a
run resumed mid-epoch continues at the same sample; the position is global (an index into the
epoch's order), which is what a distributed sampler shards. Every random draw is seeded by
(run seed, epoch, position), never by worker, so results do not depend on ``workers``.

- memory-mapped arrays: a batch is read with one fancy index of the map (``__getitems__``);
  the crops, flips and colour ops then run batched on the training device
  (``selfsup.augment.batched.make_views``);
- image files of different sizes: the workers decode each image and take each view's random
  resized crop from the original (``random_resized_crop_uint8``), so that views of one size can
  be batched; the colour ops then run batched on the device.

Extraction (``eval_batches``): uint8 batches in index order; for files the workers decode,
resize the shorter side to ``resize_size`` and centre-crop ``crop_size`` (the papers' 256 / 224).
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from selfsup.augment.batched import ViewSpec, random_resized_crop_uint8, resize_center_crop_uint8
from selfsup.data.prepared import FileSplit, Split

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio): per-position seeds from one epoch seed


def resolve_workers(workers: int, split: Split | FileSplit) -> int:
    """-1 (auto): the cores available for image files, in-process for memory-mapped arrays."""
    if workers >= 0:
        return workers
    if isinstance(split, Split):
        return 0
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def sample_seed(epoch_seed: int, pos: int) -> int:
    return (epoch_seed + (pos + 1) * _MIX) & 0x7FFFFFFFFFFFFFFF


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """This rank's batches of (index, per-sample seed) over an epoch's order, from a start batch on.

    Global batch s covers positions [s G, (s + 1) G) of the order, G = batch_size x world; rank r
    takes the r-th ``batch_size`` of them, so the position is global (a run resumes at the same
    sample with any number of processes: start batch = position // G) and W ranks together see
    what one process with batch G would. One process keeps a short last batch (unless
    ``drop_last``; a size-1 tail is always dropped: batch norm cannot train on one sample);
    several drop an incomplete global batch, so every rank takes the same number of equal steps
    (gathers need equal shapes)."""

    def __init__(self, batch_size: int, drop_last: bool, rank: int = 0, world: int = 1):
        self.batch_size, self.drop_last, self.rank, self.world = batch_size, drop_last, rank, world
        self.order = np.zeros(0, np.int64)
        self.start, self.epoch_seed = 0, 0

    def set_epoch(self, order: np.ndarray, epoch_seed: int, start_batch: int = 0) -> None:
        self.order, self.epoch_seed, self.start = np.asarray(order, np.int64), epoch_seed, start_batch

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def num_batches(self, n: int | None = None) -> int:
        n = len(self.order) if n is None else n
        full, rest = divmod(n, self.global_batch)
        return full + (1 if self.world == 1 and rest > 1 and not self.drop_last else 0)

    def __len__(self) -> int:
        return self.num_batches() - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g, b = self.global_batch, self.batch_size
        for s in range(self.start, self.num_batches()):
            lo = s * g + self.rank * b
            pos = range(lo, min(lo + b, len(self.order)))
            yield [(int(self.order[p]), sample_seed(self.epoch_seed, p)) for p in pos]


class _ArrayItems(Dataset):
    def __init__(self, split: Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitems__(self, items: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = np.fromiter((i for i, _ in items), np.int64, len(items))
        return self.split.read_batch(idx), torch.from_numpy(np.asarray(self.split.y[idx])), torch.from_numpy(idx)


class _FileItems(Dataset):
    def __init__(self, split: FileSplit, crops: list[ViewSpec]):
        self.split, self.crops = split, crops

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, int]) -> tuple[tuple[torch.Tensor, ...], int, int]:
        i, seed = item
        img = self.split.read(i)  # (3, H, W) uint8, any size
        g = torch.Generator().manual_seed(seed)
        views = tuple(random_resized_crop_uint8(img, v.size, v.scale, v.ratio, g) if v.crop
                      else resize_center_crop_uint8(img, v.size, v.size) for v in self.crops)
        return views, int(self.split.y[i]), i


def _first(batch: Any) -> Any:  # arrays: __getitems__ already returns the collated batch
    return batch


def _stack_views(items: list[tuple[tuple[torch.Tensor, ...], int, int]]) -> tuple[list[torch.Tensor], torch.Tensor,
                                                                                   torch.Tensor]:
    nv = len(items[0][0])
    views = [torch.stack([it[0][v] for it in items]) for v in range(nv)]  # each (B, 3, S, S) uint8
    return views, torch.tensor([it[1] for it in items]), torch.tensor([it[2] for it in items])


class TrainLoader:
    """Training batches: ``(x, y, idx)``; ``x`` is a uint8 (B, C, H, W) batch of the original images
    (arrays) or a list with one uint8 crop batch per view (files: ``crops``, one per view, in the
    order ``selfsup.augment.batched.make_views`` produces them)."""

    def __init__(self, split: Split | FileSplit, batch_size: int, drop_last: bool, workers: int,
                 crops: list[ViewSpec] | None = None, pin_memory: bool = False, rank: int = 0, world: int = 1):
        self.batches = EpochBatches(batch_size, drop_last, rank, world)
        self.files = isinstance(split, FileSplit)
        nw = resolve_workers(workers, split)
        ds = _FileItems(split, crops or []) if self.files else _ArrayItems(split)
        self.loader = DataLoader(ds, batch_sampler=self.batches, num_workers=nw,
                                 collate_fn=_stack_views if self.files else _first, pin_memory=pin_memory,
                                 persistent_workers=nw > 0, prefetch_factor=4 if nw > 0 else None)

    def epoch(self, order: np.ndarray, epoch_seed: int, start_batch: int = 0) -> Iterator[Any]:
        self.batches.set_epoch(order, epoch_seed, start_batch)
        return iter(self.loader)

    def num_batches(self, n: int) -> int:
        return self.batches.num_batches(n)


class _EvalFiles(Dataset):
    def __init__(self, split: FileSplit, resize: int, crop: int):
        self.split, self.resize, self.crop = split, resize, crop

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> torch.Tensor:
        return resize_center_crop_uint8(self.split.read(i), self.resize, self.crop)  # (3, crop, crop)


def eval_batches(split: Split | FileSplit, batch_size: int, workers: int = -1, resize: int = 256,
                 crop: int = 224, indices: np.ndarray | None = None) -> Iterator[torch.Tensor]:
    """uint8 (B, C, H, W) batches of ``split`` in index order (or of ``indices``), eval geometry."""
    if isinstance(split, Split):
        n = len(split) if indices is None else len(indices)
        for s in range(0, n, batch_size):
            yield split.read_batch(slice(s, s + batch_size) if indices is None else indices[s:s + batch_size])
        return
    ds: Dataset = _EvalFiles(split, resize, crop)
    if indices is not None:
        ds = torch.utils.data.Subset(ds, indices.tolist())
    nw = resolve_workers(workers, split)
    yield from DataLoader(ds, batch_size=batch_size, num_workers=nw, shuffle=False,
                          prefetch_factor=4 if nw > 0 else None)

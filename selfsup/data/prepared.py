"""The prepared dataset, read back without loading its pixels.

The ``download`` stage (``selfsup/data/sources.py``) writes one of two on-disk formats::

    data/dataset/meta.json   name, format, classes, n_train, n_test, counts, channels,
                             image_size ([H, W] for arrays, null for files), mean, std (in
                             [0, 1], measured on a fixed random sample), source, source_sha256,
                             root (files)
    format "array" (small fixed-size sets: digits, CIFAR, STL-10, SVHN, an imagefolder decoded
    at dataset.image_size):
        {train,test}_x.npy  uint8 (N, H, W, C), opened memory-mapped (never read whole)
        {train,test}_y.npy  int64 (N,), -1 where unlabelled
    format "files" (image folders of any size, ImageNet):
        {train,test}_index.parquet  path (relative to meta.root), label, width, height

Methods and evaluation read labels and dataset facts through ``Data`` (``n_train``,
``num_classes``, ``has_labels``, ``train.y``); pixels only through the loaders
(``selfsup/data/loader.py``), a batch at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selfsup.core.io import InputError, read_json


@dataclass
class Split:
    """Fixed-size images: ``x`` uint8 (N, H, W, C) (an array or a read-only memory map), ``y`` (N,)."""

    x: np.ndarray
    y: np.ndarray  # int64 (N,), -1 where unlabelled

    fixed = True

    def __len__(self) -> int:
        return len(self.y)

    @property
    def channels(self) -> int:
        return int(self.x.shape[3])

    def read_batch(self, idx: np.ndarray | slice) -> Any:
        """uint8 (B, C, H, W) tensor of the images at ``idx`` (one read of those rows only)."""
        import torch

        rows = np.array(self.x[idx]) if isinstance(idx, slice) else self.x[np.asarray(idx)]  # (B, H, W, C) copy
        return torch.from_numpy(np.ascontiguousarray(rows)).permute(0, 3, 1, 2)


@dataclass
class FileSplit:
    """Image files of any size, decoded one at a time (in DataLoader workers)."""

    root: Path
    paths: np.ndarray  # (N,) bytes (fixed width: no per-item Python objects shared with workers)
    y: np.ndarray  # int64 (N,)
    sizes: np.ndarray  # int64 (N, 2): height, width

    fixed = False
    channels = 3

    def __len__(self) -> int:
        return len(self.y)

    def path(self, i: int) -> Path:
        return self.root / self.paths[i].decode()

    def read(self, i: int) -> Any:
        """uint8 (3, H, W) tensor of image ``i`` (decoded as RGB)."""
        return decode_rgb(self.path(i))


def decode_rgb(p: Path) -> Any:
    """An image file -> uint8 (3, H, W) tensor, RGB (Pillow: torchvision.io's decoders are
    deprecated from torchvision 0.29 on)."""
    import torch
    from PIL import Image

    try:
        with Image.open(p) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB"), np.uint8).copy()).permute(2, 0, 1)
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: unreadable image ({e})") from e


@dataclass
class Data:
    train: Split | FileSplit
    test: Split | FileSplit
    meta: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def has_labels(self) -> bool:
        return bool((self.train.y >= 0).any())

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """(H, W) of every image for array sets, None for files of different sizes."""
        return tuple(self.meta["image_size"]) if self.meta.get("image_size") else None


def _load_files(folder: Path, split: str, root: Path) -> FileSplit:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = folder / f"{split}_index.parquet"
    if not f.is_file():
        raise InputError(f"{f}: missing (run `dvc repro download`)")
    try:
        t = pq.read_table(f)
        paths = t.column("path").to_numpy(zero_copy_only=False).astype("S")
        y = t.column("label").to_numpy().astype(np.int64)
        sizes = np.stack([t.column("height").to_numpy(), t.column("width").to_numpy()], 1).astype(np.int64)
    except (pa.ArrowInvalid, KeyError, OSError) as e:
        raise InputError(f"{f}: corrupt index ({e})") from e
    return FileSplit(root, paths, y, sizes)


def load_prepared(folder: str | Path) -> Data:
    folder = Path(folder)
    meta = read_json(folder / "meta.json")
    splits: dict[str, Split | FileSplit] = {}
    for split in ("train", "test"):
        if meta.get("format", "array") == "files":
            s: Split | FileSplit = _load_files(folder, split, Path(meta["root"]))
        else:
            arrays = {}
            for part in ("x", "y"):
                f = folder / f"{split}_{part}.npy"
                if not f.is_file():
                    raise InputError(f"{f}: missing (run `dvc repro download`)")
                try:
                    arrays[part] = np.load(f, mmap_mode="r" if part == "x" else None)
                except (ValueError, OSError, EOFError) as e:
                    raise InputError(f"{f}: corrupt array file ({e})") from e
            x, y = arrays["x"], arrays["y"]
            if x.ndim != 4 or x.dtype != np.uint8 or len(x) != len(y):
                raise InputError(f"{folder}/{split}_x.npy: shape {x.shape} / labels {y.shape} disagree")
            s = Split(x, y)
        if len(s) != meta[f"n_{split}"]:
            raise InputError(f"{folder}: {split} has {len(s)} images, meta.json says {meta[f'n_{split}']}")
        splits[split] = s
    return Data(splits["train"], splits["test"], meta)

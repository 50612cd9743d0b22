"""Datasets: fetch or read the sources, write one uniform on-disk format, load it back.

On-disk format (the ``download`` stage writes it, every later stage reads it)::

    data/dataset/
        train_x.npy  uint8 (N, H, W, C)     train_y.npy  int64 (N,)   (-1: no label)
        test_x.npy   uint8 (M, H, W, C)     test_y.npy   int64 (M,)
        meta.json    name, classes, counts, image_size, channels, mean, std (of train,
                     in [0, 1]), source_sha256, source
"""
from __future__ import annotations

import hashlib
import importlib.resources
import tarfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from selfsup.config import DatasetCfg
from selfsup.io import InputError, atomic_dir, derive_seed, read_json, sha256_file, write_json

IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


class DatasetUnavailable(RuntimeError):
    """The source could not be fetched or read (offline, missing path, ...)."""


@dataclass
class Split:
    x: np.ndarray  # uint8 (N, H, W, C)
    y: np.ndarray  # int64 (N,), -1 where unlabelled


@dataclass
class Prepared:
    train: Split
    test: Split
    classes: list[str]
    source: str
    source_sha256: str


# --------------------------------------------------------------------------- sources
def digits_source(cfg: DatasetCfg, seed: int) -> Prepared:
    """scikit-learn's bundled 8x8 digits (1,797 images, no network)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    # pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap); map to 0..255
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=cfg.test_fraction, stratify=y, random_state=derive_seed(seed, "digits-split")
    )
    src = importlib.resources.files("sklearn.datasets") / "data" / "digits.csv.gz"
    return Prepared(Split(xtr, ytr), Split(xte, yte), [str(i) for i in range(10)],
                    "sklearn.datasets.load_digits", sha256_file(str(src)))


def _torchvision(cfg: DatasetCfg, seed: int) -> Prepared:
    """CIFAR-10/100, STL-10, SVHN through torchvision's downloaders (md5-checked)."""
    import torchvision.datasets as tvd

    root = Path(cfg.root)
    root.mkdir(parents=True, exist_ok=True)
    name = cfg.name

    def get(**kw: Any) -> Any:
        cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "stl10": tvd.STL10, "svhn": tvd.SVHN}[name]
        try:
            return cls(str(root), download=cfg.download, **kw)
        except (urllib.error.URLError, OSError) as e:
            raise DatasetUnavailable(
                f"dataset.name={name}: could not download to {root} ({e}). This machine looks offline: "
                f"copy the archive torchvision expects into {root}, or use dataset.name=imagefolder "
                f"with dataset.path=<folder or .tar>"
            ) from e
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted" (failed md5 / missing)
            raise DatasetUnavailable(
                f"dataset.name={name}: {e} (root {root}; set dataset.download=true to fetch it)"
            ) from e

    if name in ("cifar10", "cifar100"):
        tr, te = get(train=True), get(train=False)
        train = Split(np.asarray(tr.data, np.uint8), np.asarray(tr.targets, np.int64))
        test = Split(np.asarray(te.data, np.uint8), np.asarray(te.targets, np.int64))
        classes = list(tr.classes)
        archive = root / tr.filename
    else:
        # STL-10 and SVHN store (N, C, H, W)
        splits = ("train+unlabeled" if cfg.include_unlabeled else "train", "test") if name == "stl10" else ("train", "test")
        tr, te = get(split=splits[0]), get(split=splits[1])
        train = Split(np.ascontiguousarray(tr.data.transpose(0, 2, 3, 1)), np.asarray(tr.labels, np.int64))
        test = Split(np.ascontiguousarray(te.data.transpose(0, 2, 3, 1)), np.asarray(te.labels, np.int64))
        classes = list(tr.classes) if hasattr(tr, "classes") else [str(i) for i in range(10)]
        archive = root / (tr.filename if name == "stl10" else tr.split_list["train"][1])
        archive = archive if archive.is_file() else Path(tr.root) / getattr(tr, "filename", "")
    sha = sha256_file(archive) if archive.is_file() else ""
    return Prepared(train, test, classes, f"torchvision.datasets.{type(tr).__name__}", sha)


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive, refusing any member that would land outside ``dest``."""
    dest = dest.resolve()
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            target = (dest / m.name).resolve()
            if not target.is_relative_to(dest):
                raise InputError(f"{archive}: member {m.name!r} escapes the extraction folder; refusing")
            if m.issym() or m.islnk():
                link = (target.parent / m.linkname).resolve() if m.issym() else (dest / m.linkname).resolve()
                if not link.is_relative_to(dest):
                    raise InputError(f"{archive}: link {m.name!r} -> {m.linkname!r} escapes; refusing")
            if m.isdev():
                raise InputError(f"{archive}: device file {m.name!r}; refusing")
        # the 'data' filter repeats these checks inside tarfile (and drops odd permissions); it
        # exists from Python 3.10.12 / 3.11.4 on, older patch releases rely on the checks above
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)  # noqa: S202 (every member was checked above)


def _find_split_root(folder: Path) -> Path:
    for cand in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return cand
    raise DatasetUnavailable(f"{folder}: no train/ and test/ folders found (expected <root>/train/<class>/*)")


def _imagefolder(cfg: DatasetCfg, seed: int) -> Prepared:
    """``train/<class>/*`` and ``test/<class>/*``; images directly in train/ are unlabelled (-1)."""
    from PIL import Image

    src = Path(cfg.path)
    if not src.exists():
        raise DatasetUnavailable(f"dataset.path: {src} does not exist")
    if src.is_file():
        if not tarfile.is_tarfile(src):
            raise DatasetUnavailable(f"dataset.path: {src} is a file but not a tar archive")
        sha = sha256_file(src)
        dest = Path(cfg.root) / f"{src.name.split('.')[0]}-{sha[:12]}"
        if not (dest / ".complete").is_file():
            with atomic_dir(dest) as tmp:
                safe_extract(src, tmp)
                (tmp / ".complete").write_text(sha)
        root = _find_split_root(dest)
    else:
        root = _find_split_root(src)
        sha = ""
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    cidx = {c: i for i, c in enumerate(classes)}
    h = hashlib.sha256()

    def load(split: str) -> Split:
        files: list[tuple[Path, int]] = []
        for p in sorted((root / split).rglob("*")):
            if p.suffix.lower() not in IMG_EXT:
                continue
            rel = p.relative_to(root / split).parts
            if len(rel) == 1:
                label = -1
            elif rel[0] in cidx:
                label = cidx[rel[0]]
            else:
                raise InputError(f"{p}: class folder {rel[0]!r} is not among the train classes")
            files.append((p, label))
        if not files:
            raise DatasetUnavailable(f"{root / split}: no images found")
        xs = []
        for p, _ in tqdm(files, desc=f"read {split}", unit="img", mininterval=2):
            try:
                with Image.open(p) as im:
                    im = im.convert("RGB")
                    if cfg.image_size:
                        im = im.resize((cfg.image_size, cfg.image_size), Image.BILINEAR)
                    xs.append(np.asarray(im, np.uint8))
            except OSError as e:
                raise InputError(f"{p}: unreadable image ({e})") from e
            if not sha:
                h.update(str(p.relative_to(root)).encode())
                h.update(p.read_bytes())
        shapes = {a.shape for a in xs}
        if len(shapes) > 1:
            raise InputError(f"{root / split}: images differ in size {sorted(shapes)[:3]}...; set dataset.image_size")
        return Split(np.stack(xs), np.array([lab for _, lab in files], np.int64))

    train, test = load("train"), load("test")
    return Prepared(train, test, classes, f"imagefolder:{src}", sha or h.hexdigest())


SOURCES: dict[str, Callable[[DatasetCfg, int], Prepared]] = {
    "digits": digits_source,
    "cifar10": _torchvision,
    "cifar100": _torchvision,
    "stl10": _torchvision,
    "svhn": _torchvision,
    "imagefolder": _imagefolder,
}


def _cap(split: Split, n: int, seed: int) -> Split:
    if not n or n >= len(split.y):
        return split
    idx = np.sort(np.random.default_rng(seed).permutation(len(split.y))[:n])
    return Split(split.x[idx], split.y[idx])


def prepare(cfg: DatasetCfg, seed: int, out_dir: str | Path) -> dict[str, Any]:
    """Fetch/read the configured dataset and write the uniform format to ``out_dir``."""
    p = SOURCES[cfg.name](cfg, seed)
    train = _cap(p.train, cfg.max_train, derive_seed(seed, "cap-train"))
    test = _cap(p.test, cfg.max_test, derive_seed(seed, "cap-test"))
    xf = train.x.astype(np.float64) / 255.0
    meta = {
        "name": cfg.name,
        "classes": p.classes,
        "n_train": int(len(train.y)),
        "n_test": int(len(test.y)),
        "counts": {
            "train": np.bincount(train.y[train.y >= 0], minlength=len(p.classes)).tolist(),
            "test": np.bincount(test.y[test.y >= 0], minlength=len(p.classes)).tolist(),
            "train_unlabeled": int((train.y < 0).sum()),
            "test_unlabeled": int((test.y < 0).sum()),
        },
        "image_size": list(train.x.shape[1:3]),
        "channels": int(train.x.shape[3]),
        "mean": xf.mean(axis=(0, 1, 2)).tolist(),
        "std": xf.std(axis=(0, 1, 2)).tolist(),
        "source": p.source,
        "source_sha256": p.source_sha256,
    }
    with atomic_dir(out_dir) as tmp:
        for split, s in (("train", train), ("test", test)):
            np.save(tmp / f"{split}_x.npy", s.x)
            np.save(tmp / f"{split}_y.npy", s.y)
        write_json(tmp / "meta.json", meta)
    return meta


# --------------------------------------------------------------------------- loading
@dataclass
class Data:
    train: Split
    test: Split
    meta: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def has_labels(self) -> bool:
        return bool((self.train.y >= 0).any())


def load_prepared(folder: str | Path) -> Data:
    folder = Path(folder)
    meta = read_json(folder / "meta.json")
    arrays = {}
    for name in ("train_x", "train_y", "test_x", "test_y"):
        f = folder / f"{name}.npy"
        if not f.is_file():
            raise InputError(f"{f}: missing (run `dvc repro download`)")
        try:
            arrays[name] = np.load(f)
        except (ValueError, OSError, EOFError) as e:
            raise InputError(f"{f}: corrupt array file ({e})") from e
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 4 or x.dtype != np.uint8 or len(x) != len(y) or len(y) != meta[f"n_{split}"]:
            raise InputError(f"{folder}/{split}_x.npy: shape {x.shape} / labels {y.shape} disagree with meta.json")
    return Data(Split(arrays["train_x"], arrays["train_y"]), Split(arrays["test_x"], arrays["test_y"]), meta)


class ImageDataset(Dataset):
    """uint8 HWC arrays -> (transform(image), label, index). ``views`` > 1 gives a tuple of views."""

    def __init__(self, split: Split, transform: Callable[[torch.Tensor], torch.Tensor], views: int = 1):
        # (N, C, H, W) uint8 tensor once, so per-item work is only the transform
        self.x = torch.from_numpy(np.ascontiguousarray(split.x.transpose(0, 3, 1, 2)))
        self.y = torch.from_numpy(split.y)
        self.transform = transform
        self.views = views

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor, int]:
        img = self.x[i]
        if self.views == 1:
            return self.transform(img), self.y[i], i
        return tuple(self.transform(img) for _ in range(self.views)), self.y[i], i


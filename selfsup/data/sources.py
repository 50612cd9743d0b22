"""The download stage: fetch or read the configured source, write the uniform format.

Two formats (read back by ``selfsup/data/prepared.py``, which documents them):
- ``array``: small fixed-size sets (scikit-learn's digits, CIFAR-10/100, STL-10, SVHN through
  torchvision's md5-checked downloaders, an image folder decoded at ``dataset.image_size``):
  uint8 ``.npy`` arrays that later stages open memory-mapped;
- ``files``: image folders of any size and ImageNet: an index of the files (path, label, size),
  no pixels copied.

The channel mean / std come from a fixed random sample of ``dataset.stats_sample`` training
images (all of them when fewer), accumulated image by image in float64: never a float copy of
the dataset.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import tarfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from selfsup.data.config import DatasetCfg
from selfsup.data.prepared import Split, decode_rgb
from selfsup.core.io import InputError, atomic_dir, derive_seed, sha256_file, write_json

IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


class DatasetUnavailable(RuntimeError):
    """The source could not be fetched or read (offline, missing path, ...)."""


@dataclass
class Listing:
    """Image files of one split: paths relative to the source root, labels (-1: none)."""

    paths: list[str]
    y: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Prepared:
    train: Split | Listing
    test: Split | Listing
    classes: list[str]
    source: str
    source_sha256: str
    root: Path | None = None  # files: the folder the listing's paths are relative to
    decode_size: int = 0  # files: > 0 = decode into arrays of this square size


# --------------------------------------------------------------------------- array sources
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
    """CIFAR-10/100, STL-10, SVHN through torchvision's downloaders (md5-checked). torchvision
    holds these small sets in memory; they are written once as arrays."""
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


# --------------------------------------------------------------------------- file sources
def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive, refusing any member that would land outside ``dest`` (and links out of it,
    device files). From Python 3.10.12 / 3.11.4 on, tarfile's ``data`` filter makes these checks while
    it extracts; older patch releases get them member by member first. (The two together took twice as
    long: 60,000 ``realpath`` calls each on the CIFAR-10 JPEG copy.) A refused member leaves nothing:
    callers extract into an ``atomic_dir``."""
    dest = dest.resolve()
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            try:
                tar.extractall(dest, filter="data")
            except tarfile.FilterError as e:
                raise InputError(f"{archive}: member {e.tarinfo.name!r} escapes the extraction folder or is no "
                                 f"plain file ({type(e).__name__}: {e}); refusing") from e
            return
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
        tar.extractall(dest)  # noqa: S202 (every member was checked above)


def _find_split_root(folder: Path, test: str = "test") -> Path:
    for cand in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if (cand / "train").is_dir() and (cand / test).is_dir():
            return cand
    raise DatasetUnavailable(f"{folder}: no train/ and {test}/ folders found (expected <root>/train/<class>/*)")


def _list_split(root: Path, split: str, cidx: dict[str, int]) -> Listing:
    """``root/split/<class>/*`` (label = class index) and ``root/split/*`` (unlabelled, -1)."""
    paths, labels = [], []
    for p in sorted((root / split).rglob("*")):
        if p.suffix.lower() not in IMG_EXT or not p.is_file():
            continue
        rel = p.relative_to(root / split).parts
        if len(rel) == 1:
            label = -1
        elif rel[0] in cidx:
            label = cidx[rel[0]]
        else:
            raise InputError(f"{p}: class folder {rel[0]!r} is not among the classes")
        paths.append(p.relative_to(root).as_posix())
        labels.append(label)
    if not paths:
        raise DatasetUnavailable(f"{root / split}: no images found")
    return Listing(paths, np.array(labels, np.int64))


def _listing_digest(root: Path, listings: list[Listing]) -> str:
    """sha256 of the file names and sizes (not their bytes: ImageNet is 150 GB)."""
    h = hashlib.sha256()
    for lst in listings:
        for rel in lst.paths:
            h.update(rel.encode())
            h.update(str((root / rel).stat().st_size).encode())
    return h.hexdigest()


def check_source(cfg: DatasetCfg) -> None:
    """The cheap checks of ``dataset.path`` (it exists, and is what ``dataset.name`` reads), made by the
    ``check`` stage before the download stage removes ``data/dataset``, and again by the readers."""
    src = Path(cfg.path)
    if cfg.name == "imagefolder":
        if not src.exists():
            raise DatasetUnavailable(f"dataset.path: {src} does not exist")
        if src.is_file() and not tarfile.is_tarfile(src):
            raise DatasetUnavailable(f"dataset.path: {src} is a file but not a tar archive")
    elif cfg.name == "imagenet" and not src.is_dir():
        raise DatasetUnavailable(f"dataset.path: {src} is not a folder (dataset.name=imagenet)")


def _imagefolder(cfg: DatasetCfg, seed: int) -> Prepared:
    """``train/<class>/*`` and ``test/<class>/*``; images directly in train/ are unlabelled (-1)."""
    check_source(cfg)
    src = Path(cfg.path)
    if src.is_file():
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
    # the class folders of train/ and test/ (an unlabelled train/ may hold none)
    classes = sorted({p.name for split in ("train", "test") for p in (root / split).iterdir() if p.is_dir()})
    cidx = {c: i for i, c in enumerate(classes)}
    train, test = _list_split(root, "train", cidx), _list_split(root, "test", cidx)
    return Prepared(train, test, classes, f"imagefolder:{src}", sha or _listing_digest(root, [train, test]),
                    root=root.resolve(), decode_size=cfg.image_size)


IMAGENET_ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz")


def _imagenet(cfg: DatasetCfg, seed: int) -> Prepared:
    """ILSVRC2012 from a local path (never downloaded: the licence requires a login).

    Either the prepared layout ``train/<wnid>/*.JPEG`` + ``val/<wnid>/*.JPEG`` (the PyTorch
    ImageNet example's), or torchvision's ``ImageNet`` archives (``ILSVRC2012_img_train.tar``,
    ``ILSVRC2012_img_val.tar``, ``ILSVRC2012_devkit_t12.tar.gz``) in ``dataset.path``, which
    torchvision checks (md5) and unpacks into that layout once. The test split is val (50,000)."""
    check_source(cfg)
    src = Path(cfg.path)
    source = f"imagenet:{src}"
    if not ((src / "train").is_dir() and (src / "val").is_dir()):
        if not all((src / a).is_file() for a in IMAGENET_ARCHIVES):
            raise DatasetUnavailable(
                f"dataset.path: {src} has neither train/ + val/ folders nor torchvision's archives "
                f"({', '.join(IMAGENET_ARCHIVES)})")
        import torchvision.datasets as tvd

        for split in ("train", "val"):  # md5-checks and unpacks into src/train, src/val (once)
            tvd.ImageNet(str(src), split=split)
        source = f"torchvision.datasets.ImageNet:{src}"
    wnids = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    cidx = {w: i for i, w in enumerate(wnids)}
    train, test = _list_split(src, "train", cidx), _list_split(src, "val", cidx)
    return Prepared(train, test, wnids, source, _listing_digest(src, [train, test]), root=src.resolve())


SOURCES: dict[str, Callable[[DatasetCfg, int], Prepared]] = {
    "digits": digits_source,
    "cifar10": _torchvision,
    "cifar100": _torchvision,
    "stl10": _torchvision,
    "svhn": _torchvision,
    "imagefolder": _imagefolder,
    "imagenet": _imagenet,
}


# --------------------------------------------------------------------------- writing
def _cap_idx(n: int, cap: int, seed: int) -> np.ndarray | None:
    if not cap or cap >= n:
        return None
    return np.sort(np.random.default_rng(seed).permutation(n)[:cap])


def _subset(s: Split | Listing, idx: np.ndarray | None) -> Split | Listing:
    if idx is None:
        return s
    if isinstance(s, Listing):
        return Listing([s.paths[i] for i in idx], s.y[idx])
    return Split(s.x[idx], s.y[idx])


def _images(s: Split | Listing, root: Path | None, idx: np.ndarray) -> Iterator[np.ndarray]:
    """uint8 (H, W, C) images of ``s`` at ``idx``, one at a time."""
    for i in idx:
        if isinstance(s, Listing):
            yield decode_rgb(root / s.paths[i]).permute(1, 2, 0).numpy()
        else:
            yield np.asarray(s.x[i])


def channel_stats(images: Iterator[np.ndarray]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (in [0, 1]) over all pixels of ``images``, accumulated in float64
    one image at a time (images may differ in size)."""
    tot = sq = None
    count = 0
    for im in images:
        v = im.reshape(-1, im.shape[-1]).astype(np.float64) / 255.0  # (H*W, C)
        tot = v.sum(0) if tot is None else tot + v.sum(0)
        sq = (v * v).sum(0) if sq is None else sq + (v * v).sum(0)
        count += len(v)
    mean = tot / count
    return mean.tolist(), np.sqrt(np.maximum(sq / count - mean * mean, 0.0)).tolist()


def _sizes(root: Path, lst: Listing) -> tuple[np.ndarray, np.ndarray]:
    """(height, width) of every file, from the headers only."""
    from PIL import Image

    hw = np.zeros((len(lst), 2), np.int64)
    for i, rel in enumerate(tqdm(lst.paths, desc="image sizes", unit="img", mininterval=2)):
        try:
            with Image.open(root / rel) as im:
                hw[i] = im.size[1], im.size[0]
        except OSError as e:
            raise InputError(f"{root / rel}: unreadable image ({e})") from e
    return hw[:, 0], hw[:, 1]


def _write_index(path: Path, root: Path, lst: Listing) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    h, w = _sizes(root, lst)
    pq.write_table(pa.table({"path": pa.array(lst.paths, pa.string()), "label": lst.y, "height": h, "width": w}),
                   path)


def _write_decoded(folder: Path, split: str, root: Path, lst: Listing, size: int) -> None:
    """Decode, resize to size x size and write into a memory-mapped .npy, one image at a time."""
    from torchvision.transforms.v2 import functional as F

    x = np.lib.format.open_memmap(folder / f"{split}_x.npy", mode="w+", dtype=np.uint8, shape=(len(lst), size, size, 3))
    for i, rel in enumerate(tqdm(lst.paths, desc=f"decode {split}", unit="img", mininterval=2)):
        im = F.resize(decode_rgb(root / rel), [size, size], antialias=True)  # (3, size, size) uint8
        x[i] = im.permute(1, 2, 0).numpy()
    x.flush()
    del x
    np.save(folder / f"{split}_y.npy", lst.y)


def prepare(cfg: DatasetCfg, seed: int, out_dir: str | Path) -> dict[str, Any]:
    """Fetch/read the configured dataset and write the uniform format to ``out_dir``."""
    p = SOURCES[cfg.name](cfg, seed)
    train = _subset(p.train, _cap_idx(len(p.train), cfg.max_train, derive_seed(seed, "cap-train")))
    test = _subset(p.test, _cap_idx(len(p.test), cfg.max_test, derive_seed(seed, "cap-test")))
    files = isinstance(train, Listing) and not p.decode_size
    n = len(train)
    sample = np.arange(n) if n <= cfg.stats_sample else \
        np.sort(np.random.default_rng(derive_seed(seed, "stats-sample")).choice(n, cfg.stats_sample, replace=False))
    if isinstance(train, Listing) and p.decode_size:  # stats of the decoded images, as training sees them
        mean = std = None
    else:
        mean, std = channel_stats(tqdm(_images(train, p.root, sample), total=len(sample), desc="mean/std",
                                       unit="img", mininterval=2, disable=len(sample) < 5000))
    meta: dict[str, Any] = {
        "name": cfg.name,
        "format": "files" if files else "array",
        "classes": p.classes,
        "n_train": int(len(train)),
        "n_test": int(len(test)),
        "counts": {
            "train": np.bincount(train.y[train.y >= 0], minlength=len(p.classes)).tolist(),
            "test": np.bincount(test.y[test.y >= 0], minlength=len(p.classes)).tolist(),
            "train_unlabeled": int((train.y < 0).sum()),
            "test_unlabeled": int((test.y < 0).sum()),
        },
        "source": p.source,
        "source_sha256": p.source_sha256,
    }
    with atomic_dir(out_dir) as tmp:
        if files:
            assert p.root is not None
            for split, s in (("train", train), ("test", test)):
                _write_index(tmp / f"{split}_index.parquet", p.root, s)
            meta.update(root=str(p.root), image_size=None, channels=3)
        else:
            for split, s in (("train", train), ("test", test)):
                if isinstance(s, Listing):
                    _write_decoded(tmp, split, p.root, s, p.decode_size)
                else:
                    np.save(tmp / f"{split}_x.npy", s.x)
                    np.save(tmp / f"{split}_y.npy", s.y)
            x = np.load(tmp / "train_x.npy", mmap_mode="r")
            if mean is None:
                mean, std = channel_stats(np.asarray(x[i]) for i in sample)
            meta.update(image_size=list(x.shape[1:3]), channels=int(x.shape[3]))
            del x
        meta.update(mean=mean, std=std)
        write_json(tmp / "meta.json", meta)
    return meta

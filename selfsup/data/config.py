"""The ``dataset:`` section of params.yaml: which data the download stage prepares and how the image
files are cropped (``selfsup/data/sources.py`` reads it). Parsed when first read
(``selfsup.core.config.SECTIONS``)."""
from __future__ import annotations

from dataclasses import dataclass

from selfsup.core.config import ConfigError, non_negative, one_of, positive


# --------------------------------------------------------------------------- sections
DATASETS = ("digits", "cifar10", "cifar100", "stl10", "svhn", "imagefolder", "imagenet")


@dataclass
class DatasetCfg:
    name: str = "digits"
    root: str = "data/raw"  # cache folder for torchvision downloaders / extracted archives
    # imagefolder: a folder, or a .tar / .tar.gz / .tar.xz of one; imagenet: the ILSVRC2012 folder
    # (train/<wnid>/*.JPEG + val/<wnid>/*, or torchvision's ImageNet archives + devkit)
    path: str = ""
    download: bool = True  # torchvision datasets: allow the (checksummed) download
    test_fraction: float = 0.2  # digits only: stratified held-out split
    # imagefolder: 0 = stream the image files (any sizes; an index, no pixels copied);
    # > 0 = decode once into a memory-mapped array of this square size (small fixed-size sets)
    image_size: int = 0
    # images of different sizes (imagefolder with image_size 0, imagenet): the train views are
    # crops of the original image resized to crop_size; eval resizes the shorter side to
    # resize_size and takes the central crop_size (the papers' 256 / 224)
    crop_size: int = 224
    resize_size: int = 256
    stats_sample: int = 10_000  # images (fixed random sample) the channel mean / std are computed on
    include_unlabeled: bool = False  # stl10: add the 100k unlabeled images (label -1)
    max_train: int = 0  # cap on training images (0: all); a stratified-free prefix after a seeded shuffle
    max_test: int = 0

    def check(self, p: str) -> None:
        one_of(p, "name", self.name, DATASETS)
        if self.name in ("imagefolder", "imagenet") and not self.path:
            raise ConfigError(f"{p}.path: dataset.name={self.name} needs a folder (or .tar) path")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"{p}.test_fraction: must be in (0, 1), got {self.test_fraction}")
        non_negative(p, self, "image_size", "max_train", "max_test")
        positive(p, self, "crop_size", "resize_size", "stats_sample")
        if self.crop_size > self.resize_size:
            raise ConfigError(f"{p}.crop_size: {self.crop_size} above resize_size {self.resize_size}")

"""One typed config, built from ``params.yaml``.

Every section is a dataclass. ``load_config`` walks the YAML, rejects unknown
keys and values of the wrong type, and runs each section's ``check`` so that bad
input fails *before any work starts*, with a message naming the key
(``deepcluster.k: must be > 0, got 0``).

Method blocks (``deepcluster:``, ``supervised:``, ...) are parsed with the config
class that the method registers (see ``selfsup/methods/__init__.py``), so adding a
method touches its own file, its params block and the ``methods`` list only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad key or value in params.yaml (the message names the key)."""


# --------------------------------------------------------------------------- sections
DATASETS = ("digits", "cifar10", "cifar100", "stl10", "svhn", "imagefolder")
BACKBONES = ("smallcnn", "resnet18_cifar", "resnet18", "resnet50", "alexnet_bn")
AUGMENTS = ("none", "crop", "crop_flip")


@dataclass
class DatasetCfg:
    name: str = "digits"
    root: str = "data/raw"  # cache folder for torchvision downloaders / extracted archives
    path: str = ""  # imagefolder: a folder, or a .tar / .tar.gz / .tar.xz of one
    download: bool = True  # torchvision datasets: allow the (checksummed) download
    test_fraction: float = 0.2  # digits only: stratified held-out split
    image_size: int = 0  # imagefolder: resize to this square size (0: keep, sizes must agree)
    include_unlabeled: bool = False  # stl10: add the 100k unlabeled images (label -1)
    max_train: int = 0  # cap on training images (0: all); a stratified-free prefix after a seeded shuffle
    max_test: int = 0

    def check(self, p: str) -> None:
        one_of(p, "name", self.name, DATASETS)
        if self.name == "imagefolder" and not self.path:
            raise ConfigError(f"{p}.path: dataset.name=imagefolder needs a folder or .tar path")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"{p}.test_fraction: must be in (0, 1), got {self.test_fraction}")
        non_negative(p, self, "image_size", "max_train", "max_test")


@dataclass
class ModelCfg:
    backbone: str = "smallcnn"
    sobel: bool = False  # DeepCluster's fixed grayscale+Sobel front end (sec. 4 of the paper)

    def check(self, p: str) -> None:
        one_of(p, "backbone", self.backbone, BACKBONES)


LR_SCHEDULES = ("constant", "cosine", "step")


@dataclass
class TrainCfg:
    """Fields every trainable method shares; a method's config subclasses it."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-5
    augment: str = "crop"  # train-time augmentation preset, one of AUGMENTS (see selfsup/transforms.py)
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    # learning rate per epoch (selfsup.train.epoch_lr): constant (DeepCluster, SeLa), cosine
    # (MoCo v2, SimCLR), step (InstDisc: x0.1 at each epoch listed in lr_steps); an optional
    # linear warm-up over the first warmup_epochs (SimCLR)
    lr_schedule: str = "constant"
    lr_steps: list[int] = field(default_factory=list)
    warmup_epochs: int = 0
    # colour / blur augmentations after the crop (selfsup/transforms.py), off by default.
    # jitter: ColorJitter [brightness, contrast, saturation, hue], applied with jitter_p
    # (InstDisc: [0.4]*4, p 1; MoCo v2 and SimCLR CIFAR (s=0.5): [0.4, 0.4, 0.4, 0.1], p 0.8);
    # grayscale_p: RandomGrayscale (0.2 in all three); blur_p: Gaussian blur, sigma in
    # [0.1, 2], kernel ~10% of the image (MoCo v2 0.5; SimCLR 0.5 on ImageNet, none on CIFAR).
    # Saturation, hue and grayscale leave 1-channel images unchanged.
    jitter: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    jitter_p: float = 0.8
    grayscale_p: float = 0.0
    blur_p: float = 0.0

    def check(self, p: str) -> None:
        positive(p, self, "epochs", "batch_size", "lr")
        non_negative(p, self, "momentum", "weight_decay", "warmup_epochs")
        one_of(p, "augment", self.augment, AUGMENTS)
        lo_hi = self.crop_scale
        if len(lo_hi) != 2 or not 0.0 < lo_hi[0] <= lo_hi[1] <= 1.0:
            raise ConfigError(f"{p}.crop_scale: need [lo, hi] with 0 < lo <= hi <= 1, got {lo_hi}")
        one_of(p, "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if any(not 0 < e for e in self.lr_steps) or self.lr_steps != sorted(self.lr_steps):
            raise ConfigError(f"{p}.lr_steps: need increasing positive epochs, got {self.lr_steps}")
        if len(self.jitter) != 4 or any(v < 0 for v in self.jitter) or self.jitter[3] > 0.5:
            raise ConfigError(f"{p}.jitter: need [brightness, contrast, saturation, hue] >= 0, hue <= 0.5, "
                              f"got {self.jitter}")
        for n in ("jitter_p", "grayscale_p", "blur_p"):
            if not 0.0 <= getattr(self, n) <= 1.0:
                raise ConfigError(f"{p}.{n}: a probability in [0, 1], got {getattr(self, n)}")
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(f"{p}.warmup_epochs: {self.warmup_epochs} must be below epochs ({self.epochs})")


@dataclass
class ExtractCfg:
    batch_size: int = 256

    def check(self, p: str) -> None:
        positive(p, self, "batch_size")


@dataclass
class WhitenCfg:
    pca_dim: int = 32  # final-feature PCA-whitening before the cluster stage

    def check(self, p: str) -> None:
        positive(p, self, "pca_dim")


@dataclass
class ClusterCfg:
    k: int = 0  # 0: as many clusters as classes
    niter: int = 20
    nredo: int = 5  # restarts, keep the best objective (evaluation: less seed noise)
    init: str = "kmeans++"  # random (faiss) | kmeans++

    def check(self, p: str) -> None:
        non_negative(p, self, "k")
        positive(p, self, "niter", "nredo")
        one_of(p, "init", self.init, ("random", "kmeans++"))


@dataclass
class KnnProtocol:
    k: int = 200
    temperature: float = 0.07

    def check(self, p: str) -> None:
        positive(p, self, "k", "temperature")


@dataclass
class KnnCfg:
    # the common protocol, the same for every method so rows compare
    k: list[int] = field(default_factory=lambda: [200, 20])  # first one is the headline number
    temperature: float = 0.07  # InstDisc / DINO weighting exp(sim / T)
    # a method's own paper protocol, reported beside the common one (knn_paper_top1)
    paper: dict[str, KnnProtocol] = field(default_factory=dict)

    def check(self, p: str) -> None:
        if not self.k or any(v <= 0 for v in self.k):
            raise ConfigError(f"{p}.k: need a non-empty list of positive ints, got {self.k}")
        positive(p, self, "temperature")


@dataclass
class LinearCfg:
    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.1
    weight_decay: float = 1e-4

    def check(self, p: str) -> None:
        positive(p, self, "epochs", "batch_size", "lr")
        non_negative(p, self, "weight_decay")


@dataclass
class MlflowCfg:
    enabled: bool = True
    experiment: str = "selfsup"

    def check(self, p: str) -> None:
        if not self.experiment:
            raise ConfigError(f"{p}.experiment: must not be empty")


# InstDisc's Table 1 (Wu et al. 2018) as a sweep: each row is the `instdisc` block with
# these overrides (selfsup/table1.py); dvc.yaml runs one `table1@<row>` stage per row.
INSTDISC_SOFTMAX = ("nonparametric", "parametric")


@dataclass
class Table1Row:
    softmax: str = "nonparametric"  # nonparametric | parametric (the paper's baseline)
    nce_m: int = 0  # NCE noise samples; 0: exact softmax (capped below the training-set size)

    def check(self, p: str) -> None:
        one_of(p, "softmax", self.softmax, INSTDISC_SOFTMAX)
        non_negative(p, self, "nce_m")
        if self.softmax == "parametric" and self.nce_m:
            raise ConfigError(f"{p}.nce_m: the parametric softmax is exact; use 0, got {self.nce_m}")


def _table1_rows() -> dict[str, Table1Row]:
    return {"parametric": Table1Row("parametric", 0), "nonparametric": Table1Row("nonparametric", 0),
            **{f"nce{m}": Table1Row("nonparametric", m) for m in (1, 10, 512, 4096)}}


@dataclass
class InstDiscTable1Cfg:
    epochs: int = 0  # 0: instdisc.epochs (and its lr schedule) unchanged
    knn_k: int = 200  # the paper's weighted kNN, temperature = the row's training temperature
    rows: dict[str, Table1Row] = field(default_factory=_table1_rows)

    def check(self, p: str) -> None:
        non_negative(p, self, "epochs")
        positive(p, self, "knn_k")
        if not self.rows:
            raise ConfigError(f"{p}.rows: list at least one row")


VOC_DATASETS = ("embedded", "voc2007", "voc2007+2012")
VOC_ARCHS = ("c4", "fpn")
VOC_BN = ("frozen", "train", "sync")
VOC_AP = ("11point", "area")


@dataclass
class EmbeddedVocCfg:
    """The offline default: digits of the held-out digits split on larger canvases (selfsup/voc_data.py)."""

    classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # digit classes, named digit<k>
    trainval_images: int = 80
    test_images: int = 40
    canvas: list[int] = field(default_factory=lambda: [36, 48])  # side in [lo, hi] px (height, width drawn apart)
    scales: list[int] = field(default_factory=lambda: [2, 3])  # 8x8 digits upscaled by one of these (nearest)
    max_objects: int = 3  # 1..max_objects digits per image
    truncated_p: float = 0.15  # an object placed partly outside the canvas (box clipped, truncated=1)
    difficult_p: float = 0.15  # an object drawn at low contrast (difficult=1)

    def check(self, p: str) -> None:
        if not self.classes or len(set(self.classes)) != len(self.classes) or not all(0 <= c <= 9 for c in self.classes):
            raise ConfigError(f"{p}.classes: need distinct digits 0..9, got {self.classes}")
        positive(p, self, "trainval_images", "test_images", "max_objects")
        lo_hi = self.canvas
        if len(lo_hi) != 2 or not 16 <= lo_hi[0] <= lo_hi[1]:
            raise ConfigError(f"{p}.canvas: need [lo, hi] with 16 <= lo <= hi, got {lo_hi}")
        if not self.scales or any(s < 1 or 8 * s > lo_hi[0] for s in self.scales):
            raise ConfigError(f"{p}.scales: each in [1, canvas[0] / 8], got {self.scales}")
        for n in ("truncated_p", "difficult_p"):
            if not 0.0 <= getattr(self, n) <= 1.0:
                raise ConfigError(f"{p}.{n}: a probability in [0, 1], got {getattr(self, n)}")


@dataclass
class VocCfg:
    """Detection transfer (stages voc_data, voc@<m>; selfsup/voc_data.py, detection.py, voc_eval.py)."""

    # data (the voc_data stage reads only these five)
    dataset: str = "embedded"  # embedded | voc2007 | voc2007+2012 (trainval; test is always VOC2007 test)
    root: str = "data/raw/voc"  # torchvision's VOC download / extraction folder
    path: str = ""  # a local VOCdevkit folder (VOC2007/, VOC2012/) instead of downloading
    download: bool = True
    embedded: EmbeddedVocCfg = field(default_factory=EmbeddedVocCfg)
    # detector
    arch: str = "c4"  # resnets: c4 (layer4 as the box head) | fpn; smallcnn / alexnet_bn: one map + MLP head
    bn: str = "frozen"  # frozen | train | sync (sync needs a torch.distributed multi-device run)
    freeze_at: int = 0  # stages frozen from the stem (detectron2 default 2; MoCo 0)
    min_size: int = 48  # GeneralizedRCNNTransform (VOC: 480-800 train / 800 test in MoCo's detectron2)
    max_size: int = 48
    anchor_sizes: list[int] = field(default_factory=lambda: [16, 24, 32])
    aspect_ratios: list[float] = field(default_factory=lambda: [1.0, 2.0])  # height / width
    rpn_proposals: list[int] = field(default_factory=lambda: [200, 50])  # post-NMS, train / test (VOC: 2000 / 1000)
    roi_batch: int = 32  # sampled RoIs per image (VOC: 512)
    detections: int = 20  # kept per test image (VOC: 100)
    # RPN head of the one-map detectors (smallcnn / alexnet_bn): 0 = torchvision's RPNHead (3x3 conv
    # in -> in channels); > 0 = a 3x3 conv to this width (CPU budget: the in -> in conv costs more
    # than the whole smallcnn trunk). ResNets always use torchvision's.
    rpn_channels: int = 32
    representation: int = 128  # MLP box head width (smallcnn / alexnet_bn; VOC Fast R-CNN: 4096 / 1024)
    train_difficult: bool = True  # detectron2 (MoCo) trains on difficult objects; py-faster-rcnn does not
    flip: bool = False  # horizontal flip in training (VOC: true; digits: a mirrored digit is another glyph)
    # fine-tuning (MoCo: batch 16, lr 0.02, 24k iterations, steps 18k/22k, warm-up 100)
    steps: int = 120
    batch_size: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    warmup_steps: int = 20
    lr_steps: list[int] = field(default_factory=lambda: [100])
    # evaluation: AP of the COCO-style mean over IoU 0.5:0.95 and AP75 use this VOC AP
    # (detectron2's PascalVOCDetectionEvaluator, which MoCo reports: 11-point on VOC2007)
    ap_metric: str = "11point"
    score_thresh: float = 0.0  # keep low-score detections: they only add to the PR curve

    def check(self, p: str) -> None:
        one_of(p, "dataset", self.dataset, VOC_DATASETS)
        if self.path and self.dataset == "embedded":
            raise ConfigError(f"{p}.path: a VOCdevkit path needs voc.dataset voc2007 or voc2007+2012, not embedded")
        one_of(p, "arch", self.arch, VOC_ARCHS)
        one_of(p, "bn", self.bn, VOC_BN)
        one_of(p, "ap_metric", self.ap_metric, VOC_AP)
        positive(p, self, "min_size", "max_size", "roi_batch", "detections", "representation", "steps", "batch_size", "lr")
        non_negative(p, self, "rpn_channels", "freeze_at", "momentum", "weight_decay", "warmup_steps", "score_thresh")
        if self.min_size > self.max_size:
            raise ConfigError(f"{p}.min_size: {self.min_size} above max_size {self.max_size}")
        if not self.anchor_sizes or any(a <= 0 for a in self.anchor_sizes):
            raise ConfigError(f"{p}.anchor_sizes: need positive sizes, got {self.anchor_sizes}")
        if not self.aspect_ratios or any(a <= 0 for a in self.aspect_ratios):
            raise ConfigError(f"{p}.aspect_ratios: need positive ratios, got {self.aspect_ratios}")
        if len(self.rpn_proposals) != 2 or any(n <= 0 for n in self.rpn_proposals):
            raise ConfigError(f"{p}.rpn_proposals: need [train, test] > 0, got {self.rpn_proposals}")
        if any(not 0 < s < self.steps for s in self.lr_steps) or self.lr_steps != sorted(self.lr_steps):
            raise ConfigError(f"{p}.lr_steps: need increasing steps in (0, {self.steps}), got {self.lr_steps}")
        if not self.score_thresh < 1:
            raise ConfigError(f"{p}.score_thresh: must be < 1, got {self.score_thresh}")


NO_UPSTREAM = "data/dataset"  # the value of ``methods.<m>`` for a method that reads no upstream encoder


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers: int = 0  # DataLoader workers (0: in-process, bit-reproducible on a CPU)
    # method name -> its upstream input, in report order. The value is a DVC dependency
    # of the method's pretraining (dvc.yaml's foreach item): NO_UPSTREAM for none, else a
    # backbone file (another method's data/models/<m>.pt, or a local weights file) that
    # the method reads (MLCD clusters its features). A list means no upstream for all.
    methods: dict[str, str] = field(default_factory=dict)
    dataset: DatasetCfg = field(default_factory=DatasetCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    extract: ExtractCfg = field(default_factory=ExtractCfg)
    whiten: WhitenCfg = field(default_factory=WhitenCfg)
    cluster: ClusterCfg = field(default_factory=ClusterCfg)
    knn: KnnCfg = field(default_factory=KnnCfg)
    linear: LinearCfg = field(default_factory=LinearCfg)
    mlflow: MlflowCfg = field(default_factory=MlflowCfg)
    instdisc_table1: InstDiscTable1Cfg = field(default_factory=InstDiscTable1Cfg)
    voc: VocCfg = field(default_factory=VocCfg)
    # method name -> that method's config object (class registered by the method)
    method_cfgs: dict[str, Any] = field(default_factory=dict)

    def check(self, p: str = "") -> None:
        if not self.methods:
            raise ConfigError("methods: list at least one method")
        for m, up in self.methods.items():
            if not up:
                raise ConfigError(f"methods.{m}: empty upstream; use {NO_UPSTREAM} for none")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: auto, cpu, cuda or cuda:N, got {self.device!r}")
        non_negative("", self, "workers")

    def upstream(self, name: str) -> str | None:
        """The upstream file method ``name`` reads, or None."""
        up = self.methods.get(name, NO_UPSTREAM)
        return None if up == NO_UPSTREAM else up

    def method(self, name: str) -> Any:
        if name not in self.method_cfgs:
            raise ConfigError(f"methods: {name!r} has no params block")
        return self.method_cfgs[name]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(d.pop("method_cfgs"))
        return d


# --------------------------------------------------------------------------- checks
def _key(p: str, name: str) -> str:
    return f"{p}.{name}" if p else name


def positive(p: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not v > 0:
            raise ConfigError(f"{_key(p, n)}: must be > 0, got {v}")


def non_negative(p: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v < 0:
            raise ConfigError(f"{_key(p, n)}: must be >= 0, got {v}")


def one_of(p: str, name: str, value: str, allowed: typing.Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{_key(p, name)}: unknown value {value!r}; choose one of {', '.join(allowed)}")


# --------------------------------------------------------------------------- parsing
def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(key, key_tp, k): _coerce(f"{key}.{k}", item_tp, v) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config type {tp}")


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and bad types raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "method_cfgs"}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{_key(prefix, unknown[0])}: unknown key; known keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(_key(prefix, k), hints[k], v) for k, v in data.items()}
    obj = cls(**kwargs)
    obj.check(prefix)
    return obj


def load_config(source: str | Path | dict = "params.yaml", parse_methods: bool = True) -> Config:
    """Parse and validate params.yaml (or a dict of the same shape).

    ``parse_methods=False`` leaves the method blocks as plain dicts and skips importing
    the method registry (and with it torch/torchvision, ~7 s): for the evaluation
    stages, which never read them. The first stage (download) parses everything, so
    a bad method key still fails before any work.
    """
    if isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: params file not found")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    ms = raw.get("methods")
    if isinstance(ms, list):  # programmatic shorthand: no upstream for any method
        if len(set(map(str, ms))) != len(ms):
            raise ConfigError(f"methods: duplicate names in {ms}")
        raw["methods"] = {m: NO_UPSTREAM for m in ms}
    if not parse_methods:
        known = {f.name for f in dataclasses.fields(Config)}
        blocks = {k: raw.pop(k) for k in list(raw) if k not in known}
        cfg = build(Config, raw)
        cfg.method_cfgs.update(blocks)
        return cfg
    from selfsup.methods import REGISTRY  # late import: methods import this module

    method_blocks = {k: raw.pop(k) for k in list(raw) if k in REGISTRY}
    for name in raw.get("methods", {}) or {}:
        if not isinstance(name, str) or name not in REGISTRY:
            raise ConfigError(f"methods: unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}")
    cfg = build(Config, raw)
    for name, up in cfg.methods.items():
        if up != NO_UPSTREAM and not REGISTRY[name].uses_upstream:
            raise ConfigError(f"methods.{name}: {name} reads no upstream encoder; set it to {NO_UPSTREAM}")
    for name, block in method_blocks.items():
        cfg.method_cfgs[name] = build(REGISTRY[name].Config, block, name)
    for name in cfg.methods:
        if name not in cfg.method_cfgs:  # a method with no block runs on its defaults
            cfg.method_cfgs[name] = build(REGISTRY[name].Config, {}, name)
    return cfg


def config_hash(obj: Any) -> str:
    """Stable short hash of a (nested) config / JSON-able value."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

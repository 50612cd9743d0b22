"""One typed config, built from ``params.yaml``.

Every section is a dataclass. ``load_config`` walks the YAML, rejects unknown
keys and values of the wrong type, and runs each section's ``check`` so that bad
input fails *before any work starts*, with a message naming the key
(``deepcluster.k: must be > 0, got 0``).

Method blocks (``deepcluster:``, ``supervised:``, ...) are parsed with the config
class of the method file of the same name (``selfsup/methods/<name>.py``, imported by
name only when its block is parsed: this module imports no method, so a stage's import
closure, hence its DVC code deps, holds only the methods it runs). Adding a method
touches its own file, its params block and the ``methods`` list only.

``python -m selfsup.config [params.yaml]`` (``selfsup/config.py``) checks a params file without running anything.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import re

import yaml


class ConfigError(ValueError):
    """A bad key or value in params.yaml (the message names the key)."""


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers in YAML 1.2 spellings too.

    PyYAML implements YAML 1.1, whose float pattern needs a dot (``1.0e-6``), so ``1e-6``, ``1e-06``
    and ``1E+12`` load as strings. DVC writes params with ruamel.yaml (YAML 1.2): ``dvc exp run -S
    moco.weight_decay=1e-6`` leaves ``1e-06`` in params.yaml. This resolver adds the YAML 1.2 core
    schema's exponent forms (with or without a dot); integers stay integers."""


_FLOAT_12 = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$")
ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+.0123456789"))


def load_yaml(text: str) -> Any:
    """Parse params-like YAML (params.yaml, a preset, a ``--set`` value) with ``ParamsLoader``."""
    return yaml.load(text, Loader=ParamsLoader)  # noqa: S506 (a SafeLoader subclass)


def unknown_key(key: str, name: str, known: typing.Iterable[str], extra: str = "",
                also: typing.Iterable[str] = ()) -> ConfigError:
    """The error for an unknown key ``name`` (full dotted ``key``): the closest of ``known`` and ``also``
    first when one is close (``checkpoint_minute`` -> ``checkpoint_minutes``), then every known key."""
    known = sorted(known)
    close = difflib.get_close_matches(name, [*known, *also], n=1, cutoff=0.75)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"{key}: unknown key; {hint}known keys here: {', '.join(known)}{extra}")


# --------------------------------------------------------------------------- sections
DATASETS = ("digits", "cifar10", "cifar100", "stl10", "svhn", "imagefolder", "imagenet")
BACKBONES = ("smallcnn", "nin", "nin_rotnet", "resnet18_cifar", "resnet50_cifar", "resnet18", "resnet50", "alexnet_bn",
             "alexnet_rotnet", "alexnet_cfn",
             "vit_tiny", "vit_small", "vit_base", "vit_digits", "vit_small_p4", "vit_base_p4")
AUGMENTS = ("none", "crop", "crop_flip")


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


@dataclass
class ModelCfg:
    backbone: str = "smallcnn"  # the fixed Sobel front end is per method (<method>.sobel)

    def check(self, p: str) -> None:
        one_of(p, "backbone", self.backbone, BACKBONES)


LR_SCHEDULES = ("constant", "cosine", "step")
OPTIMIZERS = ("sgd", "lars", "adamw", "adam")
SCHEDULE_UNITS = ("step", "epoch")


@dataclass
class TrainCfg:
    """Fields every trainable method shares; a method's config subclasses it."""

    epochs: int = 10
    batch_size: int = 64  # per process (the global batch is batch_size x processes x accumulate)
    # this method's backbone, one of BACKBONES; "" = model.backbone (e.g. the digits default runs DINO and
    # MoCo v3 on vit_digits beside the smallcnn of the rest); the saved model file records it
    backbone: str = ""
    # optimiser (selfsup/engine/optim.py) over the parameter groups the method defines: sgd (momentum,
    # nesterov), lars (SimCLR's: trust coefficient lars_eta; groups without weight decay are not
    # adapted either), adamw (betas; decoupled weight decay), adam (betas; weight decay as an L2
    # term added to the gradient, as Caffe's Adam solver: colourisation's official solver)
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lars_eta: float = 0.001
    # LARS trust ratio: simclr eta |w| / |g + wd w| (SimCLR's LARSOptimizer), larc eta |w| /
    # (|g| + wd |w|) (NVIDIA apex LARC with clip=False, which SwAV's and SimSiam's code use)
    lars_rule: str = "simclr"
    weight_decay: float = 1e-5
    # the lr of the biases of conv and linear layers x this (Caffe's lr_mult 2 on biases in the
    # Jigsaw, colourisation and context-prediction prototxts); 1 = every parameter at the base lr
    bias_lr_mult: float = 1.0
    # no weight decay (and no LARS adaptation) on biases and normalisation weights (SimCLR's LARS,
    # BYOL, DINO); False: every parameter decays (the older papers' code)
    exclude_norm_bias: bool = False
    # DeepCluster's fixed grayscale + Sobel front end (sec. 4; its code's default), per method: SeLa's
    # and the instance methods' code run without it
    sobel: bool = False
    augment: str = "crop"  # train-time augmentation preset, one of AUGMENTS (see selfsup/augment/batched.py)
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    # learning rate (selfsup/engine/schedules.py), evaluated per optimiser step (schedule_unit: step, e.g.
    # SimCLR) or held per epoch (epoch: MoCo's and InstDisc's official per-epoch updates):
    # constant (DeepCluster, SeLa), cosine from lr to min_lr (MoCo v2, SimCLR), step: at each epoch
    # of lr_steps the lr becomes lr x the matching lr_factors entry (absolute factors, e.g.
    # InvaSpread's official 0.1 / 0.05 / 0.01; empty: x0.1 per milestone, InstDisc's 120 / 160);
    # an optional linear warm-up from 0 over the first warmup_epochs (SimCLR: 10).
    lr_schedule: str = "constant"
    schedule_unit: str = "step"
    lr_steps: list[int] = field(default_factory=list)
    lr_factors: list[float] = field(default_factory=list)
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    # the warm-up's first lr: 0 ramps lr x (step + 1) / warmup_steps; > 0 ramps linearly from this
    # value at step 0 to lr at the last warm-up step (np.linspace(start_warmup, lr, warmup_steps) of
    # SwAV's and BEiT's official schedulers: --start_warmup 0.3, --warmup_lr 1e-6)
    warmup_start_lr: float = 0.0
    # several processes (dist.nproc_per_node x dist.nnodes = W): the global batch is
    # batch_size x W x accumulate; lr_scaling rescales lr (and min_lr) from lr_base_batch to it:
    # none (lr is for the global batch as configured), linear (Goyal et al.; SimCLR's
    # lr = 0.3 x B / 256, MoCo's ImageNet recipe), sqrt (SimCLR's option for large batches)
    lr_scaling: str = "none"
    lr_base_batch: int = 256
    sync_bn: bool = False  # several processes: batch norm over the global batch (SimCLR's global BN)
    accumulate: int = 1  # loader batches per optimiser step (gradient accumulation)
    clip_grad: float = 0.0  # max global gradient norm (0: no clipping)
    drop_last: bool = False  # drop a short last batch (InvaSpread's official loader); a size-1 tail always is
    # colour / blur augmentations after the crop (selfsup/augment/batched.py), off by default.
    # jitter: ColorJitter [brightness, contrast, saturation, hue], applied with jitter_p
    # (InstDisc: [0.4]*4, p 1; MoCo v2 and SimCLR CIFAR (s=0.5): [0.4, 0.4, 0.4, 0.1], p 0.8);
    # grayscale_p: RandomGrayscale (0.2 in all three); blur_p: Gaussian blur, sigma in
    # [0.1, 2], kernel ~10% of the image (MoCo v2 0.5; SimCLR 0.5 on ImageNet, none on CIFAR);
    # solarize_p: solarisation (BYOL). Saturation, hue and grayscale leave 1-channel images unchanged.
    jitter: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    jitter_p: float = 0.8
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    solarize_p: float = 0.0

    def check(self, p: str) -> None:
        if self.backbone:
            one_of(p, "backbone", self.backbone, BACKBONES)
        positive(p, self, "epochs", "batch_size", "lr", "accumulate", "lr_base_batch")
        one_of(p, "lr_scaling", self.lr_scaling, ("none", "linear", "sqrt"))
        non_negative(p, self, "momentum", "weight_decay", "warmup_epochs", "min_lr", "clip_grad", "lars_eta",
                     "warmup_start_lr", "bias_lr_mult")
        one_of(p, "optimizer", self.optimizer, OPTIMIZERS)
        one_of(p, "lars_rule", self.lars_rule, ("simclr", "larc"))
        one_of(p, "augment", self.augment, AUGMENTS)
        lo_hi = self.crop_scale
        if len(lo_hi) != 2 or not 0.0 < lo_hi[0] <= lo_hi[1] <= 1.0:
            raise ConfigError(f"{p}.crop_scale: need [lo, hi] with 0 < lo <= hi <= 1, got {lo_hi}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{p}.betas: need [beta1, beta2] in [0, 1), got {self.betas}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise ConfigError(f"{p}.nesterov: needs optimizer sgd with momentum > 0")
        one_of(p, "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        one_of(p, "schedule_unit", self.schedule_unit, SCHEDULE_UNITS)
        check_lr_steps(p, self.lr_steps, self.lr_factors, "epochs")
        if self.min_lr > self.lr:
            raise ConfigError(f"{p}.min_lr: {self.min_lr} above lr {self.lr}")
        if len(self.jitter) != 4 or any(v < 0 for v in self.jitter) or self.jitter[3] > 0.5:
            raise ConfigError(f"{p}.jitter: need [brightness, contrast, saturation, hue] >= 0, hue <= 0.5, "
                              f"got {self.jitter}")
        for n in ("jitter_p", "grayscale_p", "blur_p", "solarize_p"):
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
    pca_dim: int = 32  # final-feature PCA-whitening before the cluster stage (capped at the features' rank)

    def check(self, p: str) -> None:
        positive(p, self, "pca_dim")


@dataclass
class ClusterCfg:
    k: int = 0  # 0: as many clusters as classes; 10 (at most one per image) on data without classes
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
    # 0: the method's training temperature, saved with its encoder (a sweep of <m>.temperature
    # moves it too), as InstDisc / InvaSpread / the MoCo demo evaluate
    temperature: float = 0.0
    features: str = "backbone"  # backbone | head (the method's eval head: e.g. the normalised 128-d embedding)
    pca_dim: int = 0  # > 0: PCA (no whitening) to this many dims first (SeLa's final kNN: PCA-128 of fc7)

    def check(self, p: str) -> None:
        positive(p, self, "k")
        non_negative(p, self, "temperature")
        one_of(p, "features", self.features, ("backbone", "head"))
        non_negative(p, self, "pca_dim")


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
    # frozen: features extracted once, standardised, cosine schedule (fast); augmented: MoCo's
    # main_lincls (random crops + flips every epoch through the frozen backbone, lr 30, x0.1 at
    # lr_steps 60 / 80 of 100 epochs, weight decay 0; selfsup/eval/augmented_linear.py). The papers' ViT protocols
    # (selfsup/eval/vit_linear.py; crops + flips every epoch through the frozen backbone, centre-crop test):
    # mae: facebookresearch/mae main_linprobe.py: BatchNorm1d(affine=False, eps 1e-6) + Linear on the
    #   CLS token, MAE's LARS, weight decay 0, lr 0.1 x B/256 (lr_scaling linear), per-step warm-up
    #   (warmup_epochs 10) then half-cosine, 90 epochs;
    # dino: facebookresearch/dino eval_linear.py: Linear on the CLS tokens of the last n_last_blocks
    #   blocks (ViT-S 4; ViT-B 1 + avgpool_patchtokens), SGD momentum 0.9, weight decay 0, lr 0.001 x B/256,
    #   cosine per epoch to 0, 100 epochs;
    # beit: microsoft/unilm beit/run_linear_eval.py: one Linear per block on [CLS, mean patch token] of
    #   the block's output, AdamW (weight decay 1e-4), lr 4e-3 (lr_scaling none), cosine per epoch; the
    #   best block is the result, as the official script reports.
    # Conv nets under mae / dino / beit: the backbone's pooled output (DINO's eval_linear.py on a ResNet).
    protocol: str = "frozen"
    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.1
    lr_scaling: str = "none"  # none | linear: lr x batch_size / 256 (MAE's blr, DINO's rule)
    weight_decay: float = 1e-4
    lr_steps: list[int] = field(default_factory=list)  # augmented: x0.1 at each (MoCo: [60, 80])
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # not frozen: RandomResizedCrop's
    flip: bool = True  # not frozen: random horizontal flips
    warmup_epochs: int = 0  # mae / dino / beit: linear warm-up from 0 (MAE: 10, per step)
    # augmented only (the frozen protocol is a per-step cosine, selfsup/eval/linear_probe.py): step, x0.1 at each of
    # lr_steps (MoCo v1 / v2 main_lincls.py), or cosine, lr x 0.5 (1 + cos(pi epoch / epochs)) per epoch
    # to 0 (facebookresearch/moco-v3 and simsiam main_lincls.py adjust_learning_rate; swav eval_linear.py
    # CosineAnnealingLR(epochs, eta_min=final_lr 0) stepped per epoch; deepmind-research byol/configs/eval.py
    # evaluates its cosine per step instead, a difference within an epoch's lr change)
    lr_schedule: str = "step"
    nesterov: bool = False  # augmented: Nesterov momentum 0.9 (deepmind-research byol/configs/eval.py)
    # augmented: sgd (momentum 0.9) | lars: apex LARC with clip=False, trust coefficient 0.001, over that SGD
    # (facebookresearch/simsiam main_lincls.py --lars; selfsup.engine.optim.LARS rule larc), weight decay as lr
    optimizer: str = "sgd"
    n_last_blocks: int = 1  # dino: CLS tokens of this many last blocks, concatenated (ViT-S 4, ViT-B 1)
    avgpool_patchtokens: bool = False  # dino: append the last block's mean patch token (ViT-B)

    PAPER = ("mae", "dino", "beit")  # the protocols of selfsup/eval/vit_linear.py

    def check(self, p: str) -> None:
        one_of(p, "protocol", self.protocol, ("frozen", "augmented", *self.PAPER))
        one_of(p, "lr_scaling", self.lr_scaling, ("none", "linear"))
        positive(p, self, "epochs", "batch_size", "lr", "n_last_blocks")
        non_negative(p, self, "weight_decay", "warmup_epochs")
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ConfigError(f"{p}.crop_scale: need [lo, hi] with 0 < lo <= hi <= 1, got {self.crop_scale}")
        if self.warmup_epochs and self.protocol not in self.PAPER:
            raise ConfigError(f"{p}.warmup_epochs: the {self.protocol} protocol has no warm-up; use 0")
        one_of(p, "lr_schedule", self.lr_schedule, ("step", "cosine"))
        one_of(p, "optimizer", self.optimizer, ("sgd", "lars"))
        for key, default in (("lr_schedule", "step"), ("nesterov", False), ("optimizer", "sgd")):
            if getattr(self, key) != default and self.protocol != "augmented":
                raise ConfigError(f"{p}.{key}: only the augmented protocol reads it (protocol is {self.protocol})")
        if self.lr_schedule == "cosine" and self.lr_steps:
            raise ConfigError(f"{p}.lr_steps: the cosine schedule has no steps, got {self.lr_steps}")
        if self.nesterov and self.optimizer != "sgd":
            raise ConfigError(f"{p}.nesterov: needs optimizer sgd")
        if any(not 0 < e for e in self.lr_steps) or self.lr_steps != sorted(self.lr_steps):
            raise ConfigError(f"{p}.lr_steps: need increasing positive epochs, got {self.lr_steps}")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs:
            raise ConfigError(f"{p}.warmup_epochs: {self.warmup_epochs} must be below epochs ({self.epochs})")
        if self.protocol != "dino" and (self.n_last_blocks != 1 or self.avgpool_patchtokens):
            key = "n_last_blocks" if self.n_last_blocks != 1 else "avgpool_patchtokens"
            raise ConfigError(f"{p}.{key}: only the dino protocol reads it (protocol is {self.protocol})")


@dataclass
class TokenizerCfg:
    """The ``tokenizer:`` block of params.yaml (the tokenizer stage). Defaults: a vq tokeniser on BEiT's
    ViT-B/16 grid with the paper's vocabulary (8192); params.yaml has the digits ones; ``selfsup/models/tokenizer.py`` builds
    and trains the tokeniser."""

    kind: str = "vq"  # vq: a VQ-VAE trained here | dalle (the paper's): DALL-E's dVAE encoder from a local weights file
    path: str = ""  # dalle: the encoder state_dict file (see the module docstring for the conversion)
    patch: int = 16  # px per token side: must equal the ViT's patch (one token per patch)
    # vq only
    vocab: int = 8192  # codebook entries (DALL-E: 8192, taken from its weights)
    hidden: int = 128  # conv channels
    dim: int = 64  # codebook entry dimension
    epochs: int = 10
    batch_size: int = 256
    lr: float = 2.0e-4  # Adam (van den Oord et al.: 2e-4)
    beta: float = 0.25  # commitment cost
    decay: float = 0.99  # codebook EMA decay
    reseed: float = 1.0  # re-seed codes assigned fewer than this many times per batch (EMA count); 0: never
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # training crops
    flip: bool = True  # training flips
    seed: int = 0

    def check(self, p: str) -> None:
        one_of(p, "kind", self.kind, ("vq", "dalle"))
        positive(p, self, "patch", "vocab", "hidden", "dim", "epochs", "batch_size", "lr")
        if self.kind == "dalle" and not self.path:
            raise ConfigError(f"{p}.path: kind dalle needs the DALL-E encoder weights file (a state_dict)")
        if self.kind == "vq" and self.patch & (self.patch - 1):
            raise ConfigError(f"{p}.patch: the vq tokeniser downsamples by stride-2 convs: a power of 2, got {self.patch}")
        if self.kind == "vq" and self.vocab < 2:
            raise ConfigError(f"{p}.vocab: at least 2 codes, got {self.vocab}")
        if self.beta < 0:
            raise ConfigError(f"{p}.beta: must be >= 0, got {self.beta}")
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"{p}.decay: an EMA decay in [0, 1), got {self.decay}")
        if self.reseed < 0:
            raise ConfigError(f"{p}.reseed: must be >= 0, got {self.reseed}")
        lo_hi = self.crop_scale
        if len(lo_hi) != 2 or not 0.0 < lo_hi[0] <= lo_hi[1] <= 1.0:
            raise ConfigError(f"{p}.crop_scale: need [lo, hi] with 0 < lo <= hi <= 1, got {lo_hi}")


@dataclass
class FinetuneCfg:
    # end-to-end fine-tuning of every method's backbone + a linear classifier on the labelled training
    # split (selfsup/eval/finetune.py; BEiT / MAE main_finetune.py). MAE ViT-B/16: adamw, lr (blr) 5e-4 x B/256,
    # batch 1024, 100 epochs, warm-up 5, weight decay 0.05, layer_decay 0.65, smoothing 0.1, mixup 0.8,
    # cutmix 1.0 (BEiT ViT-B: lr 4e-3, layer_decay 0.65, 100 epochs). Off unless a preset (or the digits
    # default) turns it on: the fine-tuning recipe is the MAE / BEiT papers' protocol, not every paper's
    enabled: bool = False
    epochs: int = 100
    # the global batch of one optimiser step (MAE / BEiT ViT-B: 1024 = their GPUs x per-GPU batch); the lr
    # scaling and the schedule use it. Fine-tuning runs in one process
    batch_size: int = 256
    # images through the network at once, gradients accumulated over batch_size / micro_batch of them
    # (0: the whole batch at once). A memory knob: for a ViT (no batch norm) it changes nothing but memory,
    # except that mixup / CutMix draw their lambda and pair the images per micro-batch, as the official code
    # does per GPU batch (BEiT 128, MAE 32); conv nets' batch norm sees micro-batches
    micro_batch: int = 0
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 5e-4  # at batch 256 (lr_scaling: linear scales it to batch_size)
    lr_scaling: str = "linear"
    momentum: float = 0.9  # sgd
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lars_eta: float = 0.001  # unused (build_optimizer's interface)
    weight_decay: float = 0.05
    warmup_epochs: int = 5
    # the cosine's floor, not scaled by the batch (MAE main_finetune.py and BEiT run_class_finetuning.py:
    # --min_lr 1e-6; lr = min_lr + (peak - min_lr) (1 + cos) / 2, both x a group's layer-decay scale)
    min_lr: float = 1e-6
    layer_decay: float = 0.65  # ViTs only: lr x layer_decay ^ (depth + 1 - layer); 1: off
    label_smoothing: float = 0.1
    mixup: float = 0.8  # Beta(alpha, alpha) of mixup; 0: off
    cutmix: float = 1.0  # Beta(alpha, alpha) of CutMix; 0: off
    mix_switch_p: float = 0.5  # both on: CutMix with this probability, else mixup (timm)
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    flip: bool = True
    # method -> how many hidden layers of its saved projection head are fine-tuned with the backbone,
    # the classifier reading the last one's output (SimCLR v2 sec. 2, "fine-tuning from a middle layer
    # of the projection head": 1; the official flag ft_proj_selector, default 0 = the backbone alone)
    head_layers: dict[str, int] = field(default_factory=dict)
    # ViTs: stochastic depth, 0 at the first block rising linearly to this at the last (MAE / BEiT
    # fine-tuning: 0.1; selfsup.models.backbones.ViT.set_drop_path); conv nets ignore it
    drop_path: float = 0.0
    # autocast of the training forward: fp32 (off) | bf16 | fp16 (with a GradScaler); MAE / BEiT
    # main_finetune.py train under torch.cuda.amp (fp16). The test pass stays fp32
    precision: str = "fp32"
    # timm's RandAugment spec on the training crops, "" off (MAE / BEiT: rand-m9-mstd0.5-inc1); torchvision's
    # RandAugment ops (selfsup.eval.finetune.RandAug says where they differ from timm's)
    randaugment: str = ""
    reprob: float = 0.0  # random erasing probability after normalisation, per-pixel N(0, 1) noise (MAE / BEiT: 0.25)
    # ViTs: the classifier's input. cls: the CLS token after the final LayerNorm; mean: the mean of the
    # last block's patch tokens then a new LayerNorm fc_norm, the final norm unused (MAE's global_pool,
    # BEiT's use_mean_pooling). Conv nets ignore it
    pool: str = "cls"
    # the classifier's init: weight ~ N(0, head_init_std) (0: PyTorch's nn.Linear default), bias 0, then
    # both x head_init_scale. MAE: std 2e-5 (trunc_normal_, cut at +-2: never reached); BEiT: std 0.02, scale 0.001
    head_init_std: float = 0.01
    head_init_scale: float = 1.0

    def randaugment_params(self, p: str = "finetune") -> tuple[int, float, float] | None:
        """(ops per image, magnitude 0-10, magnitude std) of ``randaugment`` in timm's syntax
        (``rand-m9-mstd0.5-inc1``; n defaults to 2, mstd to 0), None when off. Only the increasing op set
        (inc1) has torchvision counterparts: inc0 is refused."""
        if not self.randaugment:
            return None
        bad = ConfigError(f"{p}.randaugment: expected timm's rand-m<magnitude>[-n<ops>][-mstd<std>]-inc1, "
                          f"got {self.randaugment!r}")
        head, *parts = self.randaugment.split("-")
        got: dict[str, float] = {"n": 2.0, "mstd": 0.0, "inc": 0.0}
        for part in parts:
            key = re.fullmatch(r"(mstd|inc|m|n)([0-9]+(?:\.[0-9]*)?)", part)
            if key is None:
                raise bad
            got[key.group(1)] = float(key.group(2))
        if head != "rand":
            raise bad
        n, m, mstd, inc = int(got["n"]), got.get("m"), got["mstd"], got["inc"]
        if m is None or not 0.0 <= m <= 10.0 or n < 1 or mstd < 0:
            raise bad
        if inc != 1:
            raise ConfigError(f"{p}.randaugment: only timm's increasing op set (inc1) is reproduced, got "
                              f"{self.randaugment!r}")
        return n, m, mstd

    def check(self, p: str) -> None:
        one_of(p, "precision", self.precision, ("fp32", "bf16", "fp16"))
        one_of(p, "pool", self.pool, ("cls", "mean"))
        positive(p, self, "batch_size", "head_init_scale")
        non_negative(p, self, "head_init_std", "micro_batch", "min_lr")
        if not 0.0 <= self.reprob <= 1.0:
            raise ConfigError(f"{p}.reprob: need a probability in [0, 1], got {self.reprob}")
        self.randaugment_params(p)
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"{p}.drop_path: need 0 <= drop_path < 1, got {self.drop_path}")
        for m, k in self.head_layers.items():
            if k < 0:
                raise ConfigError(f"{p}.head_layers.{m}: a number of layers >= 0, got {k}")
        one_of(p, "optimizer", self.optimizer, ("adamw", "sgd"))
        one_of(p, "lr_scaling", self.lr_scaling, ("none", "linear", "sqrt"))
        positive(p, self, "epochs", "batch_size", "lr")
        non_negative(p, self, "weight_decay", "warmup_epochs", "mixup", "cutmix")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs:
            raise ConfigError(f"{p}.warmup_epochs: {self.warmup_epochs} must be below epochs ({self.epochs})")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"{p}.layer_decay: need 0 < layer_decay <= 1, got {self.layer_decay}")
        for k in ("label_smoothing", "mix_switch_p"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ConfigError(f"{p}.{k}: need a value in [0, 1], got {getattr(self, k)}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{p}.betas: need [beta1, beta2] in [0, 1), got {self.betas}")
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ConfigError(f"{p}.crop_scale: need [lo, hi] with 0 < lo <= hi <= 1, got {self.crop_scale}")


@dataclass
class ProbeCfg:
    # linear probes on every stage of the network (selfsup/eval/layer_probes.py; DeepCluster / SeLa / InstDisc:
    # AlexNet conv1-conv5), run by the linear stage: [] off, [all] every stage, or stage names
    # (conv1 ... for AlexNet, conv1 / layer1-4 for ResNets, block1-3 for smallcnn)
    layers: list[str] = field(default_factory=list)
    target_dim: int = 9216  # activations average-pooled to about this many dims (the papers' ~9k)
    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.1
    weight_decay: float = 1e-4
    max_train: int = 0  # 0: every training image; else a seeded subset (ImageNet: a layer must fit in memory)
    # fast: centre-crop features extracted once (max_train of them), standardised, a one-crop test;
    # paper: DeepCluster's eval_linear.py / SeLa's eval_linear_probes.py: the whole training set, random
    # resized crops + flips through the frozen backbone every epoch, BatchNorm(affine=False) on the pooled
    # map, every layer's probe trained from one pass, a 10-crop test (softmax averaged, DeepCluster's tencrops)
    protocol: str = "fast"
    # avg (DeepCluster's AvgPool2d) | max (SeLa's and RotNet's MaxPool2d) | bilinear: the colourisation
    # repo's linear test (richzhang/colorization@4617507 feature_learning_tests/linear/train_val.prototxt,
    # used by the Jigsaw, context and colourisation papers): Caffe Resize layers to the grids (a tent
    # pre-filter of radius 1 / scale, then linear interpolation on corner-aligned grids), then BatchNorm
    # without scale
    pooling: str = "avg"
    # linear | mlp: Flatten, Linear(bias False)-BN-ReLU x 2 of min(20 x classes, 2048) units, Linear
    # (gidariss/FeatureLearningRotNet@8539de6 architectures/NonLinearClassifier.py cls_type MultLayer, the
    # CIFAR-10 per-block classifiers; no affine-free BN before it)
    classifier: str = "linear"
    # lr schedule of the classifiers: step (most official probe codes: RotNet's LUT_lr, the colourisation
    # repo's Caffe step policy, SeLa's x0.1 every 10 epochs) or cosine per step to 0. step: from each
    # lr_steps milestone on the lr is lr x the matching lr_factors entry (absolute; empty: x0.1 per
    # milestone passed), no milestones = a constant lr. lr_step_unit: the milestones count epochs
    # (RotNet's LUT_lr) or optimiser steps (Caffe's stepsize, in iterations of batch_size images)
    lr_schedule: str = "step"
    lr_steps: list[int] = field(default_factory=list)
    lr_factors: list[float] = field(default_factory=list)
    lr_step_unit: str = "epoch"
    nesterov: bool = False  # SGD momentum 0.9 with Nesterov's update (RotNet's probe configs: nesterov True)

    def check(self, p: str) -> None:
        if "all" in self.layers and self.layers != ["all"]:
            raise ConfigError(f"{p}.layers: 'all' stands alone, got {self.layers}")
        one_of(p, "protocol", self.protocol, ("fast", "paper"))
        one_of(p, "pooling", self.pooling, ("avg", "max", "bilinear"))
        one_of(p, "classifier", self.classifier, ("linear", "mlp"))
        one_of(p, "lr_schedule", self.lr_schedule, ("step", "cosine"))
        one_of(p, "lr_step_unit", self.lr_step_unit, ("epoch", "iteration"))
        positive(p, self, "target_dim", "epochs", "batch_size", "lr")
        non_negative(p, self, "weight_decay", "max_train")
        check_lr_steps(p, self.lr_steps, self.lr_factors, "milestones")
        if self.lr_schedule == "cosine" and self.lr_steps:
            raise ConfigError(f"{p}.lr_steps: the cosine schedule has no steps, got {self.lr_steps}")
        if self.protocol == "paper" and self.max_train:
            raise ConfigError(f"{p}.max_train: the paper protocol trains on the whole training set; use 0")


@dataclass
class SvmCfg:
    # a linear SVM on frozen, L2-normalised features (liblinear through scikit-learn's LinearSVC,
    # one-vs-rest, squared hinge): InstDisc Table 1's "linear" column, DeepCluster's VOC07
    # classification. The papers pick C by validation; here it is a param
    enabled: bool = True
    c: float = 1.0

    def check(self, p: str) -> None:
        positive(p, self, "c")


@dataclass
class MlflowCfg:
    enabled: bool = True
    experiment: str = "selfsup"

    def check(self, p: str) -> None:
        if not self.experiment:
            raise ConfigError(f"{p}.experiment: must not be empty")


# InstDisc's Table 1 (Wu et al. 2018) as a sweep: each row is the `instdisc` block with
# these overrides (selfsup/eval/instdisc_table1.py); the dvc.yaml stage table1 runs every row.
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
    # auto: the sweep runs while instdisc is among `methods` (a preset or folder without InstDisc trains
    # none of its rows); always / never: regardless of `methods`
    run: str = "auto"
    epochs: int = 0  # 0: instdisc.epochs (and its lr schedule) unchanged
    knn_k: int = 200  # the paper's weighted kNN, temperature = the row's training temperature
    rows: dict[str, Table1Row] = field(default_factory=_table1_rows)

    def check(self, p: str) -> None:
        one_of(p, "run", self.run, TABLE1_RUN)
        non_negative(p, self, "epochs")
        positive(p, self, "knn_k")  # rows: {} turns the sweep off too


TABLE1_RUN = ("auto", "always", "never")


def table1_active(run: str, methods: typing.Iterable[str]) -> bool:
    """Whether InstDisc's Table 1 sweep runs: ``instdisc_table1.run`` and the method list (``python -m
    selfsup.dag`` declares the rows' outputs by the same rule, on the raw params)."""
    return run == "always" or (run == "auto" and "instdisc" in methods)


VOC_DATASETS = ("embedded", "voc2007", "voc2007+2012")
VOC_ARCHS = ("c4", "fpn")
VOC_BN = ("frozen", "train", "sync")
VOC_AP = ("11point", "area")


@dataclass
class EmbeddedVocCfg:
    """The offline default: digits of the held-out digits split on larger canvases (selfsup/detection/voc_data.py)."""

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
    """Detection transfer (stages voc_data, voc; selfsup/detection/voc_data.py, detection.py, voc_eval.py)."""

    # off unless a preset whose paper reports VOC detection (MoCo) or the digits default turns it on:
    # the voc stage then trains no detector and the voc_data stage fetches nothing
    enabled: bool = False
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
    # detections below this score are dropped before evaluation: detectron2's 0.05 (its
    # MODEL.ROI_HEADS.SCORE_THRESH_TEST, the setting of MoCo's table); 0 keeps all (low-score
    # detections only add to the end of the PR curve)
    score_thresh: float = 0.05
    iou_compare: str = "gt"  # gt: IoU > threshold (Python devkit port, detectron2) | ge: >= (MATLAB devkit)

    def check(self, p: str) -> None:
        one_of(p, "dataset", self.dataset, VOC_DATASETS)
        if self.path and self.dataset == "embedded":
            raise ConfigError(f"{p}.path: a VOCdevkit path needs voc.dataset voc2007 or voc2007+2012, not embedded")
        one_of(p, "arch", self.arch, VOC_ARCHS)
        one_of(p, "bn", self.bn, VOC_BN)
        one_of(p, "ap_metric", self.ap_metric, VOC_AP)
        one_of(p, "iou_compare", self.iou_compare, ("gt", "ge"))
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


@dataclass
class DistCfg:
    """Several processes (``selfsup/core/launch.py``): the training and feature stages re-launch
    themselves under torchrun when nproc_per_node x nnodes > 1; DVC drives them unchanged."""

    nproc_per_node: int = 1  # processes on this machine (GPUs; on a CPU: gloo processes)
    nnodes: int = 1  # machines; > 1 needs rdzv_endpoint (every node runs the same command)
    rdzv_endpoint: str = ""  # host:port of the rendezvous (node 0), e.g. node0:29400
    rdzv_id: str = "selfsup"  # the job's rendezvous id (SLURM: $SLURM_JOB_ID)
    backend: str = "auto"  # auto (nccl on GPUs, gloo on CPUs) | nccl | gloo
    # a rank that dies or hangs makes the others stop with an error after this long (collectives'
    # timeout; torchrun itself tears the group down as soon as a process exits)
    timeout_s: float = 300.0

    def check(self, p: str) -> None:
        positive(p, self, "nproc_per_node", "nnodes", "timeout_s")
        one_of(p, "backend", self.backend, ("auto", "nccl", "gloo"))
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError(f"{p}.rdzv_endpoint: dist.nnodes={self.nnodes} needs the host:port of node 0")
        if self.rdzv_endpoint and ":" not in self.rdzv_endpoint:
            raise ConfigError(f"{p}.rdzv_endpoint: need host:port, got {self.rdzv_endpoint!r}")

    @property
    def processes(self) -> int:
        return self.nproc_per_node * self.nnodes


NO_UPSTREAM = "data/dataset"  # the value of ``methods.<m>`` for a method that reads no upstream encoder


PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class ReportCfg:
    # method -> the id of the published number its row is compared with (selfsup/report/paper_results.yaml,
    # each with its source); a preset sets these. A method left out gets paper_note instead
    paper: dict[str, str] = field(default_factory=dict)
    paper_note: str = "digits: a pipeline check at 8x8 px; no paper reports it"
    # lines added to the report's notes: ``python -m selfsup.presets apply`` writes the preset's title
    # and its differences from the paper (data, schedule, protocol) here
    notes: list[str] = field(default_factory=list)

    def check(self, p: str) -> None:
        for m, pid in self.paper.items():
            if not pid:
                raise ConfigError(f"{p}.paper.{m}: empty id; leave the method out for no paper number")


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # DataLoader workers decoding images: -1 = the cores available to this process for image
    # files, in-process (0) for memory-mapped arrays (a batch is one slice, cheaper than the
    # inter-process copy of worker processes). Results do not depend on it: every random
    # draw is seeded by (run seed, epoch, position), not by worker.
    workers: int = -1
    # the engine (selfsup/engine/loop.py): autocast precision (losses, softmax / log-sum-exp, Sinkhorn and
    # k-means stay fp32; fp16 adds a gradient scaler), channels_last memory format, torch.compile
    # of the backbone; logs are synced to the host every log_every optimiser steps (and the NaN
    # check runs there); a checkpoint every checkpoint_minutes (0: at every log sync) and at
    # every epoch end
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    log_every: int = 50
    checkpoint_minutes: float = 20.0
    # method name -> its upstream input, in report order. The value is a DVC dependency
    # of the pretrain stage (dvc.yaml, selfsup/dag.py): NO_UPSTREAM for none, else a
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
    svm: SvmCfg = field(default_factory=SvmCfg)
    probe: ProbeCfg = field(default_factory=ProbeCfg)
    finetune: FinetuneCfg = field(default_factory=FinetuneCfg)
    tokenizer: TokenizerCfg = field(default_factory=TokenizerCfg)
    mlflow: MlflowCfg = field(default_factory=MlflowCfg)
    instdisc_table1: InstDiscTable1Cfg = field(default_factory=InstDiscTable1Cfg)
    voc: VocCfg = field(default_factory=VocCfg)
    dist: DistCfg = field(default_factory=DistCfg)
    report: ReportCfg = field(default_factory=ReportCfg)
    # method name -> that method's config object (class registered by the method)
    method_cfgs: dict[str, Any] = field(default_factory=dict)

    def check(self, p: str = "") -> None:
        if not self.methods:
            raise ConfigError("methods: list at least one method")
        for m, up in self.methods.items():
            if not up:
                raise ConfigError(f"methods.{m}: empty upstream; use {NO_UPSTREAM} for none")
        self.training_order()  # an upstream cycle fails here, before any work
        for m in self.finetune.head_layers:
            if m not in self.methods:
                raise ConfigError(f"finetune.head_layers.{m}: {m!r} is not in methods ({', '.join(self.methods)})")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.workers < -1:
            raise ConfigError(f"workers: -1 (auto) or >= 0, got {self.workers}")
        one_of("", "precision", self.precision, PRECISIONS)
        positive("", self, "log_every")
        non_negative("", self, "checkpoint_minutes")

    def upstream(self, name: str) -> str | None:
        """The upstream file method ``name`` reads, or None."""
        up = self.methods.get(name, NO_UPSTREAM)
        return None if up == NO_UPSTREAM else up

    def trained_upstream(self, name: str) -> str | None:
        """The method whose final encoder method ``name`` reads (``data/models/<u>.pt`` with ``u`` in
        ``methods``: trained earlier in the same ``pretrain`` stage), or None."""
        up = self.upstream(name)
        for u in self.methods:
            if up is not None and Path(up) == Path("data/models") / f"{u}.pt":
                return u
        return None

    def training_order(self) -> list[str]:
        """The methods in the order the ``pretrain`` stage trains them: ``methods``' order, except that a
        method comes after the method whose encoder it reads (MLCD after DeepCluster)."""
        order: list[str] = []
        visiting: list[str] = []

        def visit(m: str) -> None:
            if m in order:
                return
            if m in visiting:
                cycle = " -> ".join([*visiting[visiting.index(m):], m])
                raise ConfigError(f"methods: the upstream encoders form a cycle ({cycle})")
            visiting.append(m)
            u = self.trained_upstream(m)
            if u is not None:
                visit(u)
            visiting.pop()
            order.append(m)

        for m in self.methods:
            visit(m)
        return order

    def table1_rows(self) -> dict[str, Table1Row]:
        """The rows of InstDisc's Table 1 that the ``table1`` stage runs: none while the sweep is off
        (``table1_active``)."""
        return self.instdisc_table1.rows if table1_active(self.instdisc_table1.run, self.methods) else {}

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


def check_lr_steps(p: str, steps: list[int], factors: list[float], what: str) -> None:
    """A step schedule's milestones (increasing, > 0; ``what`` names their unit) and its absolute factors
    (one per milestone, > 0; empty: x0.1 per milestone), for the training and the probe schedules."""
    if any(not 0 < e for e in steps) or steps != sorted(steps):
        raise ConfigError(f"{p}.lr_steps: need increasing positive {what}, got {steps}")
    if factors and len(factors) != len(steps):
        raise ConfigError(f"{p}.lr_factors: one factor per lr_steps entry ({len(steps)}), got {factors}")
    if any(f <= 0 for f in factors):
        raise ConfigError(f"{p}.lr_factors: factors must be > 0, got {factors}")


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
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise unknown_key(_key(prefix, unknown[0]), str(unknown[0]), names)
    kwargs = {k: _coerce(_key(prefix, k), hints[k], v) for k, v in data.items()}
    obj = cls(**kwargs)
    obj.check(prefix)
    return obj


def method_class(name: str) -> Any:
    """The class of method ``name``, imported by name (``selfsup/methods/<name>.py``): a dynamic
    import, so this module's import closure holds no method."""
    registry = importlib.import_module("selfsup.methods").REGISTRY
    return registry[name]


def method_names() -> list[str]:
    """Names of the method files (without importing them), and of methods registered in code
    when the registry is already loaded (tests register throwaway methods)."""
    names = {p.stem for p in (Path(__file__).resolve().parents[1] / "methods").glob("*.py")
             if p.stem not in ("__init__", "base")}
    loaded = sys.modules.get("selfsup.methods")
    if loaded is not None:
        names |= set(loaded.REGISTRY)
    return sorted(names)


def load_config(source: str | Path | dict = "params.yaml", parse_methods: bool | list[str] = True) -> Config:
    """Parse and validate params.yaml (or a dict of the same shape).

    ``parse_methods``: True parses every method block (importing those methods); a list parses
    only the blocks of those methods (a training stage: its own); False parses none (the
    evaluation stages, which never read them, and skip importing torch). Unparsed blocks stay
    plain dicts. The first stage (download) parses everything, so a bad method key fails before
    any work; ``python -m selfsup.config`` does the same check alone.
    """
    if isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: params file not found")
        raw = load_yaml(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    ms = raw.get("methods")
    if isinstance(ms, list):  # programmatic shorthand: no upstream for any method
        if len(set(map(str, ms))) != len(ms):
            raise ConfigError(f"methods: duplicate names in {ms}")
        raw["methods"] = {m: NO_UPSTREAM for m in ms}
    known = {f.name for f in dataclasses.fields(Config)}
    names = set(method_names())
    for k in raw:
        if k not in known and k not in names:
            raise unknown_key(str(k), str(k), known - {"method_cfgs"},
                              f"; or a method block ({', '.join(sorted(names))})", also=names)
    for name in raw.get("methods", {}) or {}:
        if not isinstance(name, str) or name not in names:
            raise ConfigError(f"methods: unknown method {name!r}; known: {', '.join(sorted(names))}")
    if isinstance(raw.get("model"), dict) and "sobel" in raw["model"]:
        raise ConfigError("model.sobel: the Sobel front end is set per method now (<method>.sobel: DeepCluster's "
                          "code on, SeLa's off); move it into the method blocks")
    blocks = {k: raw.pop(k) for k in list(raw) if k not in known}
    cfg = build(Config, raw)
    if parse_methods is False:
        cfg.method_cfgs.update(blocks)
        return cfg
    todo = set(cfg.methods) | set(blocks) if parse_methods is True else set(parse_methods)
    for name in sorted(todo):
        if name not in names:
            raise ConfigError(f"methods: unknown method {name!r}; known: {', '.join(sorted(names))}")
        cls = method_class(name)
        up = cfg.methods.get(name, NO_UPSTREAM)
        if up != NO_UPSTREAM and not cls.uses_upstream:
            raise ConfigError(f"methods.{name}: {name} reads no upstream encoder; set it to {NO_UPSTREAM}")
        cfg.method_cfgs[name] = build(cls.Config, blocks.pop(name, {}), name)  # no block: the defaults
    cfg.method_cfgs.update(blocks)  # blocks not asked for stay plain dicts
    return cfg


def config_hash(obj: Any) -> str:
    """Stable short hash of a (nested) config / JSON-able value."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


"""What every method block shares: the training keys the loop reads (``TrainCfg``: optimiser,
schedule, augmentation, batch) and the multi-crop views (``MultiCropCfg``: SwAV, DeepCluster-v2).
A method's ``Config`` subclasses one of them (``selfsup/methods/<name>.py``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from selfsup.core.config import ConfigError, check_lr_steps, non_negative, one_of, positive
from selfsup.models.config import BACKBONES


AUGMENTS = ("none", "crop", "crop_flip")


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

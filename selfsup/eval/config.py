"""The evaluation sections: ``knn:``, ``linear:``, ``probe:``, ``svm:``, ``finetune:`` (the evaluate
stage, ``selfsup/eval/``) and ``instdisc_table1:`` (InstDisc's Table 1 sweep,
``selfsup/eval/instdisc_table1.py``). Parsed when first read (``selfsup.core.config.SECTIONS``)."""
from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from typing import Any

from selfsup.core.config import ConfigError, check_lr_steps, non_negative, one_of, positive


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

    def check_with(self, p: str, cfg: Any) -> None:
        """``head_layers`` against the config's method list."""
        for m in self.head_layers:
            if m not in cfg.methods:
                raise ConfigError(f"{p}.head_layers.{m}: {m!r} is not in methods ({', '.join(cfg.methods)})")


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


# InstDisc's Table 1 (Wu et al. 2018) as a sweep: each row is the `instdisc` block with
# these overrides (selfsup/eval/instdisc_table1.py); the dvc.yaml stage table1 runs every row.
@dataclass
class Table1Row:
    softmax: str = "nonparametric"  # nonparametric | parametric (the paper's baseline)
    nce_m: int = 0  # NCE noise samples; 0: exact softmax (capped below the training-set size)

    def check(self, p: str) -> None:
        from selfsup.methods.instdisc import INSTDISC_SOFTMAX  # the method's own choices

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

    def active_rows(self, methods: typing.Iterable[str]) -> dict[str, Table1Row]:
        """The rows the ``table1`` stage runs: none while the sweep is off (``table1_active``)."""
        return self.rows if table1_active(self.run, methods) else {}


TABLE1_RUN = ("auto", "always", "never")


def table1_active(run: str, methods: typing.Iterable[str]) -> bool:
    """Whether InstDisc's Table 1 sweep runs: ``instdisc_table1.run`` and the method list (``python -m
    selfsup.dag`` declares the rows' outputs by the same rule, on the raw params)."""
    return run == "always" or (run == "auto" and "instdisc" in methods)

"""DINO: self-distillation with no labels (Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin;
ICCV 2021), as the paper (sec. 3, Algorithm 1, appendix) and the official code (facebookresearch/dino
``main_dino.py``, ``vision_transformer.DINOHead``, ``utils``) do it.

- Student g_s = backbone + ``DINOHead`` (``selfsup.models.heads``: 3-layer MLP, hidden 2048, GELU, bottleneck
  256, L2 normalisation, a weight-normalised bias-free last layer to K = ``out_dim`` 65536 whose norm is
  fixed to 1 with ``norm_last_layer``). Teacher g_t: the same network, starting as a copy of the student,
  never optimised, updated after each optimiser step as an exponential moving average of the student,
  theta_t <- l theta_t + (1 - l) theta_s, with l following a cosine from ``momentum_teacher`` (0.996) to
  1 over the run's optimiser steps (``selfsup.models.momentum.cosine_momentum``, the official
  ``cosine_scheduler(momentum_teacher, 1, epochs, iters)``); the step counter is a buffer, so a resumed
  run continues the schedule exactly.
- Multi-crop (sec. 3.1): 2 global views (``crop_scale`` 0.4-1, the dataset's view side; view 1 blur p 1,
  view 2 blur p 0.1 + solarisation p 0.2) and ``local_crops`` local ones (``local_size`` px, scale
  ``local_scale`` 0.05-0.4, blur p 0.5); flip, colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8 and grayscale
  0.2 for all. The student sees every view, the teacher only the global ones. Views of one size go
  through the backbone together, then the head runs on all of them at once (the official
  ``MultiCropWrapper``: batch-norm statistics per resolution).
- Loss (Algorithm 1): for each teacher global view i and student view v != i, the cross-entropy
  H(P_t, P_s) = -sum_k softmax((t - C) / tau_t)_k log softmax(s / tau_s)_k, averaged over the batch,
  then over the 2 (V - 1) pairs (``dino_loss``); tau_s ``student_temp`` 0.1; tau_t warms up linearly from
  ``warmup_teacher_temp`` (0.04) to ``teacher_temp`` over ``warmup_teacher_temp_epochs`` epochs, then
  stays (``teacher_temperature``: the official per-epoch ``np.linspace`` schedule).
- Centring (sec. 3.1, eq. 4): the centre C (a buffer) follows C <- m C + (1 - m) mean of the teacher
  outputs over the global batch of all ranks (``batch_centre`` all-reduces the sum), m
  ``center_momentum`` 0.9, after each batch with that batch's teacher outputs (``update_centre``).
- The last layer is frozen during the first ``freeze_last_layer`` epochs (official 1): the official code
  drops its gradients before each optimiser step; the loop here owns the step, so the method puts the
  last layer back to its frozen value right after each step of those epochs (the same weights; DDP
  still sees a gradient, so the ranks stay in step) and clears its optimiser state when it is released
  (the official optimiser has none for it at that point).
- The saved encoder is the TEACHER's backbone (sec. 3: the teacher performs better and is what the
  paper evaluates; the official kNN / linear evaluations load ``checkpoint_key teacher``); ``backbone``
  is the student, the one the optimiser trains.

Official ImageNet (ViT-S/16, main_dino.py and its README): 64 images per GPU (the README's 100-epoch
run: 8 GPUs, batch 512; its "boosted" 300-epoch run: 16 GPUs), AdamW, lr 0.0005 x batch/256 after 10
linear warm-up epochs then cosine to 1e-6, weight decay cosine 0.04 -> 0.4, gradient clipping 3.0 (per
parameter), 100 epochs (300-800 for the released models), teacher_temp 0.04 (0.07 after 30 warm-up epochs
and norm_last_layer false in the boosted ViT-S run), fp16. ResNet-50: SGD lr 0.03, weight decay 1e-4, global crops
0.14-1, local 0.05-0.14, no stochastic depth. As the official code: the weight decay of the regularised
group follows a cosine 0.04 -> 0.4 per step (``weight_decay_end``, the loop's ``selfsup.engine.schedules.wd_schedule``);
the gradients are clipped per parameter at 3.0 (``clip_grad_per_param``, ``selfsup.engine.optim.clip_grad_per_param``),
the last layer too, before its frozen-epoch reset (main_dino.py clips, then ``cancel_gradients_last_layer``; the
clip is per tensor, so the order changes nothing for the others); the final lr 1e-6 is not scaled with the batch
(``scale_min_lr`` False); the student's ViT has stochastic depth ``drop_path`` 0.1, the teacher none.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.augment.batched import ViewSpec
from selfsup.core.config import ConfigError, non_negative, positive
from selfsup.engine.config import TrainCfg
from selfsup.losses.dino import batch_centre, dino_loss, teacher_temperature, update_centre
from selfsup.models.heads import DINOHead
from selfsup.methods import register
from selfsup.models.backbones import require_vit
from selfsup.engine.contract import (
    Batch,
    EpochPlan,
    Method,
    StepOut,
    TrainContext,
    view_spec,
)
from selfsup.models.momentum import MomentumTarget
from selfsup.models.prototypes import multi_crop


# --------------------------------------------------------------------------- config
@dataclass
class DINOCfg(TrainCfg):
    # official ViT-S/16 defaults (main_dino.py; batch 64 per GPU)
    epochs: int = 100
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 0.0005
    lr_scaling: str = "linear"  # lr x batch / 256
    lr_schedule: str = "cosine"
    min_lr: float = 1e-6
    # main_dino.py: the final lr --min_lr goes to cosine_scheduler as is, only lr is x B/256;
    # True: min_lr x the lr_scaling factor, as the other methods
    scale_min_lr: bool = False
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    # main_dino.py: weight decay on a cosine from weight_decay to weight_decay_end over the run's
    # iterations (wd_schedule, the regularised param group only); equal to weight_decay: constant
    weight_decay_end: float = 0.4
    exclude_norm_bias: bool = True
    clip_grad: float = 3.0
    # utils.clip_gradients: each parameter's gradient norm clipped to clip_grad on its own; False:
    # the loop's clip of the global norm
    clip_grad_per_param: bool = True
    # stochastic depth of the student's ViT blocks (main_dino.py --drop_path_rate 0.1, rising 0 -> rate
    # over the blocks); the teacher has none. Conv nets have none: set 0 (official: ViTs only)
    drop_path: float = 0.1
    augment: str = "crop_flip"
    crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])  # global crops
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 1.0  # global view 1
    solarize_p: float = 0.0
    blur_p2: float = 0.1  # global view 2
    solarize_p2: float = 0.2
    global_size: int = 0  # side of the global views; 0: the dataset's view side (224)
    local_crops: int = 8  # 0: no multi-crop (official advice: global crop_scale [0.14, 1] then)
    local_size: int = 96
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    local_blur_p: float = 0.5
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    head_bn: bool = False  # official use_bn_in_head
    norm_last_layer: bool = True
    freeze_last_layer: int = 1  # epochs
    momentum_teacher: float = 0.996
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30  # main_dino.py's help text (its argparse default is 0)
    center_momentum: float = 0.9

    def check(self, p: str) -> None:
        super().check(p)
        positive(p, self, "out_dim", "hidden_dim", "bottleneck_dim", "head_layers", "student_temp",
                 "teacher_temp", "warmup_teacher_temp")
        non_negative(p, self, "global_size", "local_crops", "freeze_last_layer", "warmup_teacher_temp_epochs",
                     "weight_decay_end")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"{p}.drop_path: a rate in [0, 1), got {self.drop_path}")
        if self.local_crops and self.local_size <= 0:
            raise ConfigError(f"{p}.local_size: local crops need a side > 0, got {self.local_size}")
        lo_hi = self.local_scale
        if len(lo_hi) != 2 or not 0.0 < lo_hi[0] <= lo_hi[1] <= 1.0:
            raise ConfigError(f"{p}.local_scale: need [lo, hi] with 0 < lo <= hi <= 1, got {lo_hi}")
        for k in ("blur_p2", "solarize_p2", "local_blur_p"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ConfigError(f"{p}.{k}: a probability in [0, 1], got {getattr(self, k)}")
        for k in ("momentum_teacher", "center_momentum"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ConfigError(f"{p}.{k}: a decay in [0, 1], got {getattr(self, k)}")
        if self.warmup_teacher_temp_epochs > self.epochs:
            raise ConfigError(f"{p}.warmup_teacher_temp_epochs: {self.warmup_teacher_temp_epochs} above "
                              f"epochs ({self.epochs})")


# --------------------------------------------------------------------------- method
@register
class DINO(Method):
    name = "dino"
    Config = DINOCfg

    def __init__(self, backbone: Any, cfg: DINOCfg, num_classes: int):
        super().__init__(backbone, cfg, num_classes)
        c = cfg
        self.head = DINOHead(backbone.out_dim, c.out_dim, c.hidden_dim, c.bottleneck_dim, c.head_layers, c.head_bn,
                             c.norm_last_layer)
        # the teacher starts as a copy of the student (official: load_state_dict), never optimised
        self.teacher = MomentumTarget({"backbone": self.backbone, "head": self.head}, c.momentum_teacher)
        if c.drop_path:  # the student only, after the copy (main_dino.py builds the teacher without it)
            require_vit(self.backbone, "dino.drop_path", f"{c.drop_path} is stochastic depth, which main_dino.py "
                        "gives to ViTs only (set dino.drop_path: 0 for a conv net)").set_drop_path(c.drop_path)
        self.register_buffer("center", torch.zeros(1, c.out_dim))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))  # the current epoch (0-based)
        self._pending: torch.Tensor | None = None  # this batch's teacher mean, for the centre
        self._frozen: list[torch.Tensor] | None = None  # the last layer's values while it is frozen

    # ------------------------------------------------------------------ views, schedule
    def view_specs(self) -> list[ViewSpec]:
        c = self.cfg
        g1 = dataclasses.replace(view_spec(c), size=c.global_size)
        specs = [g1, dataclasses.replace(g1, blur_p=c.blur_p2, solarize_p=c.solarize_p2)]
        if c.local_crops:
            specs.append(dataclasses.replace(g1, count=c.local_crops, size=c.local_size, scale=tuple(c.local_scale),
                                             blur_p=c.local_blur_p, solarize_p=0.0))
        return specs

    def last_layer_params(self) -> list[nn.Parameter]:
        return [p for p in self.head.last_layer.parameters() if p.requires_grad]

    def _hold_last_layer(self) -> None:
        frozen = int(self.epoch) < self.cfg.freeze_last_layer
        self._frozen = [p.detach().clone() for p in self.last_layer_params()] if frozen else None

    def on_epoch_start(self, epoch: int, ctx: TrainContext) -> EpochPlan:
        self.teacher.total_steps = ctx.total_steps
        self.epoch.fill_(epoch)
        if epoch == self.cfg.freeze_last_layer > 0 and ctx.reset_optimizer_state is not None:
            ctx.reset_optimizer_state(self.last_layer_params())  # released: it starts without optimiser state
        self._hold_last_layer()
        return EpochPlan()

    def on_resume(self, ctx: TrainContext) -> None:
        self.teacher.total_steps = ctx.total_steps
        self._hold_last_layer()  # resumed inside a frozen epoch: its values are the frozen ones

    def momentum(self) -> float:
        return self.teacher.momentum()

    @property
    def teacher_backbone(self) -> nn.Module:
        return self.teacher["backbone"]

    @property
    def teacher_head(self) -> nn.Module:
        return self.teacher["head"]

    def teacher_temp(self) -> float:
        c = self.cfg
        return teacher_temperature(int(self.epoch), c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs)

    # ------------------------------------------------------------------ training
    def forward(self, batch: Batch) -> StepOut:
        c = self.cfg
        views = batch.views  # 2 global (B, C, S, S), then the local ones (B, C, s, s)
        s = self.head(multi_crop(self.backbone, views))  # (V B, K)
        with torch.no_grad():
            t = self.teacher_head(multi_crop(self.teacher_backbone, views[:2])).float()  # (2 B, K)
        tt = self.teacher_temp()
        loss = dino_loss(s, t, self.center, c.student_temp, tt)
        self._pending = batch_centre(t)
        with torch.no_grad():
            p = F.softmax((t - self.center) / tt, dim=-1)
            entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()  # low: collapse to one dimension
        return StepOut(loss, {"teacher_temp": torch.tensor(tt, device=loss.device),
                              "momentum": torch.tensor(self.momentum(), device=loss.device),
                              "teacher_entropy": entropy})

    @torch.no_grad()
    def on_after_step(self, stepped: bool) -> None:
        if stepped:
            if self._frozen is not None:  # the last layer is frozen this epoch: undo the step on it
                for p, v in zip(self.last_layer_params(), self._frozen):
                    p.copy_(v)
            self.teacher.update()  # the student changed: the teacher follows with this step's momentum
        if self._pending is not None:
            self.center.copy_(update_centre(self.center, self._pending, self.cfg.center_momentum))
        self._pending = None

    def encoder(self) -> nn.Module:
        return self.teacher_backbone

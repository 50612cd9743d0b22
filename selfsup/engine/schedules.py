"""Per-step schedules for the learning rate and (DINO) the weight decay.

One pure function of the optimiser step, so a resumed run needs no scheduler state and any
value can be checked against the papers' code:

- linear warm-up from 0 over ``warmup`` steps (SimCLR: 10 epochs; the official code ramps per
  step: ``lr * step / warmup_steps``), or from ``warmup_start`` at step 0 to the base value at the
  last warm-up step (SwAV's ``--start_warmup``, BEiT's ``--warmup_lr``: ``np.linspace``);
- then ``constant``; ``cosine`` from ``base`` to ``final`` over the remaining steps (SGDR without
  restarts; MoCo v2, SimCLR, BYOL); or ``step``: ``base x factors[i]`` from milestone i on
  (absolute factors: InvaSpread's official 0.1 / 0.05 / 0.01 at epochs 120 / 160 / 200; with no
  factors given, x0.1 per milestone passed: InstDisc's 120 / 160).

``unit: epoch`` holds the value for a whole epoch (evaluated at the epoch's first step), as
MoCo's ``adjust_learning_rate`` and InstDisc's do; ``step`` changes it every optimiser step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Schedule:
    kind: str  # constant | cosine | step
    base: float
    total_steps: int  # optimiser steps over the whole run
    steps_per_epoch: int
    warmup_steps: int = 0
    milestones: tuple[int, ...] = ()  # in epochs
    factors: tuple[float, ...] = ()  # absolute, one per milestone (empty: 0.1 ** i)
    final: float = 0.0  # cosine floor
    unit: str = "step"  # step | epoch
    warmup_start: float = 0.0  # > 0: the warm-up is np.linspace(warmup_start, base, warmup_steps)
    extra: dict = field(default_factory=dict, compare=False)

    def __call__(self, step: int) -> float:
        """The value at (0-based) optimiser step ``step``."""
        if self.unit == "epoch":
            step = (step // self.steps_per_epoch) * self.steps_per_epoch
        if step < self.warmup_steps:
            if self.warmup_start > 0:  # SwAV / BEiT: np.linspace(start_warmup, base_lr, warmup_iters)[step]
                return self.warmup_start + (self.base - self.warmup_start) * step / max(self.warmup_steps - 1, 1)
            return self.base * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base
        if self.kind == "cosine":
            n = max(self.total_steps - self.warmup_steps, 1)
            t = min(step - self.warmup_steps, n) / n
            return self.final + (self.base - self.final) * 0.5 * (1.0 + math.cos(math.pi * t))
        if self.kind == "step":
            epoch = step // self.steps_per_epoch
            passed = sum(epoch >= m for m in self.milestones)
            if passed == 0:
                return self.base
            return self.base * (self.factors[passed - 1] if self.factors else 0.1 ** passed)
        raise ValueError(f"unknown schedule {self.kind!r}")


def lr_scale(rule: str, global_batch: int, base_batch: int) -> float:
    """The learning-rate factor of a scaling rule: none 1, linear B / B0 (Goyal et al. 2017; SimCLR's
    lr = 0.3 x B / 256), sqrt sqrt(B / B0) (SimCLR's option for large batches)."""
    if rule == "none":
        return 1.0
    r = global_batch / base_batch
    return r if rule == "linear" else math.sqrt(r)


def lr_schedule(c, steps_per_epoch: int, global_batch: int | None = None) -> Schedule:
    """The learning-rate schedule of a method config (``selfsup.engine.config.TrainCfg``) at a global batch
    (default: its ``batch_size``, one process)."""
    f = lr_scale(c.lr_scaling, global_batch or c.batch_size * c.accumulate, c.lr_base_batch)
    # min_lr follows lr_scaling unless the method's config says otherwise (DINO's ``scale_min_lr``
    # False: main_dino.py passes --min_lr to cosine_scheduler as is, only the base lr is x B/256)
    final = c.min_lr * f if getattr(c, "scale_min_lr", True) else c.min_lr
    return Schedule(kind=c.lr_schedule, base=c.lr * f, total_steps=c.epochs * steps_per_epoch,
                    steps_per_epoch=steps_per_epoch, warmup_steps=int(round(c.warmup_epochs * steps_per_epoch)),
                    milestones=tuple(c.lr_steps), factors=tuple(c.lr_factors), final=final,
                    unit=c.schedule_unit, warmup_start=getattr(c, "warmup_start_lr", 0.0))


def wd_schedule(c, steps_per_epoch: int) -> Schedule | None:
    """The weight-decay schedule of a method config that has ``weight_decay_end`` (DINO): a cosine
    from ``weight_decay`` to ``weight_decay_end`` over the run's optimiser steps, one value per step,
    no warm-up (facebookresearch/dino main_dino.py: ``cosine_scheduler(weight_decay,
    weight_decay_end, epochs, len(data_loader))``). None, the groups keep their weight decay, for a
    config without the field or with equal ends (a constant)."""
    end = getattr(c, "weight_decay_end", None)
    if end is None or end == c.weight_decay:
        return None
    return Schedule(kind="cosine", base=c.weight_decay, total_steps=c.epochs * steps_per_epoch,
                    steps_per_epoch=steps_per_epoch, final=end, unit="step")

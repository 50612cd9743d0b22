"""The method interface: a method is one ``nn.Module`` holding the backbone and its heads.

The one training loop (``selfsup/train.py``) calls, per epoch::

    plan = method.epoch_start(epoch, ctx)      # re-cluster / re-label; sample order
    for x, y, idx in loader(plan.order):       # x: (B, C, H, W) or a tuple of views
        loss, logs = method.loss(x, y, idx)

and optimises ``method.persistent_params()`` with one SGD optimiser whose state is
checkpointed, plus ``method.epoch_params()`` (heads re-created every epoch, such
as DeepCluster's) with a fresh optimiser each epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from selfsup.data import Data
from selfsup.models import Backbone


@dataclass
class TrainContext:
    data: Data
    device: torch.device
    seed: int  # the run seed; derive per-epoch seeds with selfsup.io.derive_seed
    extract_batch_size: int = 256
    train_set: Any = None  # the training split with the train augmentations (ImageDataset)
    workers: int = 0
    upstream: Path | None = None  # the upstream encoder file (methods.<m> in params.yaml), if any
    work_dir: Path | None = None  # the method's persistent folder (data/pretrain/<m>/, beside the checkpoint)


@dataclass
class EpochPlan:
    # this epoch's sample indices into the training split, in order (None: a seeded shuffle of all)
    order: np.ndarray | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class Method(nn.Module):
    name: ClassVar[str]
    Config: ClassVar[type]
    trains: ClassVar[bool] = True  # False: the backbone is saved as initialised (random baseline)
    needs_labels: ClassVar[bool] = False
    views: ClassVar[int] = 1  # augmented views per image the loss takes (x is a tuple when > 1)
    uses_upstream: ClassVar[bool] = False  # reads an upstream encoder (methods.<m> in params.yaml)

    def __init__(self, backbone: Backbone, cfg: Any, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.num_classes = num_classes
        self.skipped = ""  # set by the loop when the method cannot run on this data (reason)

    @classmethod
    def from_data(cls, backbone: Backbone, cfg: Any, data: Data) -> "Method":
        """Construct for ``data`` (a method whose size depends on the training set, such as
        InstDisc's memory bank of N entries, overrides this)."""
        return cls(backbone, cfg, data.num_classes)

    @classmethod
    def validate(cls, cfg: Any, data: Data, feat_dim: int) -> None:
        """Checks that need the data or the model (raise ConfigError naming the key)."""

    def epoch_start(self, epoch: int, ctx: TrainContext) -> EpochPlan:
        return EpochPlan()

    def loss(self, x: Any, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError(f"{type(self).__name__} must implement loss()")

    def persistent_params(self) -> list[nn.Parameter]:
        epoch_ids = {id(p) for p in self.epoch_params()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in epoch_ids]

    def epoch_params(self) -> list[nn.Parameter]:
        return []

    def epoch_optimizer(self) -> torch.optim.Optimizer | None:
        """A fresh optimiser for ``epoch_params()`` (None when there are none)."""
        params = self.epoch_params()
        if not params:
            return None
        c = self.cfg
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    # what goes into the checkpoint besides the optimiser: default the whole state
    def checkpoint_state(self) -> dict[str, Any]:
        return {"module": self.state_dict()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["module"])

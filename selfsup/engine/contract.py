"""The method contract: a method is one ``nn.Module`` holding the backbone and its heads.

The one training loop (``selfsup/engine/loop.py``) calls, per epoch and step::

    plan = method.on_epoch_start(epoch, ctx)   # re-cluster / re-label; the epoch's sample order
    for batch in epoch:                        # Batch: the views the method declared, labels, indices
        out = model(batch)                     # forward -> StepOut(loss, logs); under DDP the
        (out.loss / accumulate).backward()     #   wrapper's hooks fire because forward is called
        optimiser step (every ``accumulate`` batches)
        method.on_after_step(stepped)          # state updates: EMA, key queue, memory bank

- ``view_specs()`` declares the augmented views (count, size, crop scale, colour pipeline;
  ``selfsup.augment.batched.ViewSpec``), so multi-crop is one declaration. The default is
  ``views`` copies of the view described by the method's config keys (``augment``,
  ``crop_scale``, ``jitter``, ...).
- ``param_groups()`` declares what the optimiser (``selfsup.engine.optim``) updates and how: weight-decay
  exclusions, per-group ``lr_scale``, momentum; frozen parts are simply left out.
- ``encoder()`` is the network saved as the method's result (the backbone; a teacher for DINO).
- ``checkpoint_state()`` must hold everything a run resumed mid-epoch needs (the loop also saves
  the optimiser, the epoch's plan and its position); ``on_resume`` rebuilds what lives on disk
  (MLCD's assignment table).

Methods read the data through ``TrainContext``: dataset facts and labels (``ctx.data``: ``n_train``,
``num_classes``, ``train.y``), features of the training split (``ctx.extract``) and augmented
training batches (``ctx.augmented_batches``), never whole-dataset pixel arrays.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch
from torch import nn

from selfsup.augment.batched import ViewSpec, view_spec  # noqa: F401 (view_spec: part of the method contract)
from selfsup.data.batches import Batch  # noqa: F401 (part of the method contract)
from selfsup.data.prepared import Data
from selfsup.models.backbones import Backbone
from selfsup.engine.optim import param_groups


@dataclass
class StepOut:
    loss: torch.Tensor  # scalar, float32
    logs: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars, averaged per epoch


@dataclass
class EpochPlan:
    # this epoch's sample indices into the training split, in order (None: a seeded shuffle of all)
    order: np.ndarray | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainContext:
    """What a method may use besides its batches; built by the loop (``selfsup.engine.loop``)."""

    data: Data
    device: torch.device
    seed: int  # the run seed; derive per-epoch seeds with selfsup.core.io.derive_seed
    extract_batch_size: int = 256
    workers: int = -1
    upstream: Path | None = None  # the upstream encoder file (methods.<m> in params.yaml), if any
    work_dir: Path | None = None  # the method's persistent folder (data/pretrain/<m>/, beside the checkpoint)
    # set by the loop: eval-geometry sizes for image files, the views' batch maker, optimiser access
    total_steps: int = 0  # optimiser steps of the whole run (epochs x steps per epoch): BYOL's schedule
    resize_size: int = 256
    crop_size: int = 224
    make_batches: Callable[..., Iterator[Batch]] | None = None
    reset_optimizer_state: Callable[[list[nn.Parameter]], None] | None = None

    def extract(self, model: Callable[[torch.Tensor], torch.Tensor], desc: str = "features") -> np.ndarray:
        """(N, D) float32 features of the whole training split in index order (eval geometry); with
        several processes each extracts its share and every rank gets all of them."""
        from selfsup.models.features import extract_sharded

        return extract_sharded(model, self.data.train, self.data.meta, self.device, self.extract_batch_size,
                               desc=desc, workers=self.workers, resize=self.resize_size, crop=self.crop_size)

    def augmented_batches(self, specs: list[ViewSpec], seed: int, batch_size: int | None = None) -> Iterator[Batch]:
        """The whole training split once, shuffled (seeded by ``seed``), with the train augmentations of
        ``specs`` (e.g. SeLa's re-labelling pass, which the official code runs on the training loader)."""
        assert self.make_batches is not None, "set by the training loop"
        return self.make_batches(specs, seed, batch_size or self.extract_batch_size)


class Method(nn.Module):
    name: ClassVar[str]
    Config: ClassVar[type]
    trains: ClassVar[bool] = True  # False: the backbone is saved as initialised (random baseline)
    needs_labels: ClassVar[bool] = False
    views: ClassVar[int] = 1  # copies of the config's view per image (view_specs() for anything else)
    uses_upstream: ClassVar[bool] = False  # reads an upstream encoder (methods.<m> in params.yaml)
    # pictures the method draws after training (``render_pictures``), files under reports/
    pictures: ClassVar[tuple[str, ...]] = ()

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
    def input_adapter(cls, cfg: Any, meta: dict[str, Any]) -> dict[str, Any] | None:
        """An input adapter spec (``selfsup.models.backbones.ADAPTERS``) the encoder carries, e.g. colourisation's
        RGB -> L; None: the encoder takes the dataset's channels as they are."""
        return None

    @classmethod
    def backbone_options(cls, cfg: Any, meta: dict[str, Any], image_size: int) -> dict[str, Any]:
        """Architecture options of the encoder (``build_backbone``'s ``norm`` and ``grid``, e.g. CPC's
        layer norms and patch grid), recorded in the saved model; {}: the backbone as named."""
        return {}

    @classmethod
    def skip_reason(cls, data: Data) -> str:
        """Why the method cannot run on ``data`` ("" if it can): the loop then saves the backbone at
        its init and the report shows the reason instead of numbers."""
        if cls.needs_labels and not data.has_labels:
            return f"{cls.name}: skipped, the training split has no labels (the backbone stays at its init)"
        return ""

    @classmethod
    def validate(cls, cfg: Any, data: Data, feat_dim: int) -> None:
        """Checks that need the data or the model (raise ConfigError naming the key)."""

    # ------------------------------------------------------------------ the contract
    def view_specs(self) -> list[ViewSpec]:
        return [view_spec(self.cfg, self.views)]

    def samples_per_epoch(self, n_train: int) -> int:
        """Length of an epoch's order (DeepCluster's ``reassign`` draws a multiple of N)."""
        return n_train

    def param_groups(self) -> list[dict[str, Any]]:
        c = self.cfg
        return param_groups(self, c.weight_decay, c.exclude_norm_bias, bias_lr_mult=c.bias_lr_mult)

    def on_epoch_start(self, epoch: int, ctx: TrainContext) -> EpochPlan:
        return EpochPlan()

    def forward(self, batch: Batch) -> StepOut:
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")

    def on_after_step(self, stepped: bool) -> None:
        """After each batch's backward; ``stepped``: the optimiser stepped (the last batch of an
        accumulation group). State updates that use this step's outputs go here."""

    def on_resume(self, ctx: TrainContext) -> None:
        """After the checkpoint state was loaded, before training continues."""

    def encoder(self) -> nn.Module:
        """The network saved as the result (``data/models/<m>.pt``)."""
        return self.backbone

    def eval_head(self) -> nn.Module | None:
        """What the method's paper evaluates after the backbone (a ``selfsup.models.heads.EvalHead``: e.g. the
        L2-normalised 128-d embedding InstDisc's kNN reads), saved with the encoder; None: the backbone
        features themselves. ``knn.paper.<m>.features: head`` evaluates on it."""
        return None

    def render_pictures(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """{file name in ``pictures``: uint8 (H, W, 3) image} drawn from a few normalised test images
        (N, C, S, S) after training."""
        return {}

    def rank_local_params(self) -> list[str]:
        """Names of parameters each rank holds its own part of (model parallelism, e.g. MLCD's
        sharded centres): DDP does not average them; the method makes their gradient right."""
        return []

    # what goes into the checkpoint besides the optimiser: default the whole state. Called on every
    # rank (it may gather rank-local state); rank 0 writes it
    def checkpoint_state(self) -> dict[str, Any]:
        return {"module": self.state_dict()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["module"])

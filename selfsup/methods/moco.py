"""MoCo v2: momentum contrast (He, Fan, Wu, Xie, Girshick; CVPR 2020) with the v2
improvements (Chen, Fan, Girshick, He; arXiv 2003.04297), as the papers and the
official code (facebookresearch/moco ``moco/builder.py``, ``main_moco.py`` and the
one-GPU CIFAR-10 demo notebook) do it.

- Query encoder f_q = backbone + head; key encoder f_k a copy of it that receives no
  gradient and follows f_q by the momentum update theta_k <- m theta_k + (1 - m)
  theta_q (sec. 3.2, Eq. 2; ``selfsup.models.momentum.ema_update``). The official ``forward``
  applies it before computing the keys; here it runs in ``on_after_step``, right after the
  optimiser step, which is the same sequence (the first official update is a no-op: f_k
  starts as a copy of f_q).
- InfoNCE (Eq. 1; ``selfsup.losses.contrastive.info_nce``) of each query against its key
  (the other view) and a FIFO queue of ``queue_size`` past keys
  (``selfsup.models.momentum.KeyQueue``), temperature ``temperature``; the batch's keys are
  enqueued after the step (``on_after_step``).
- v2: an MLP head (Linear -> ReLU -> Linear, no BN, as the official ``--mlp``),
  temperature 0.2, cosine lr, blur augmentation ("aug+"), on ImageNet.
- Shuffle-BN (sec. 3.3): with several processes, as the official ``_batch_shuffle_ddp``: the
  key views of all ranks are gathered, permuted by a permutation drawn on rank 0 and broadcast,
  each rank encodes its slice of the shuffled batch (so its BN statistics mix images of other
  ranks), the keys are gathered and un-shuffled, and each rank keeps its own; the queue is fed
  with the gathered keys, so it is identical on every rank (``bn_splits`` is ignored there).
  On one device we do what the official CIFAR demo does: ``bn_splits`` sub-batch BN
  (``selfsup.models.momentum.SplitBatchNorm``) in both encoders plus a random permutation of the key
  batch (``shuffle_bn``). ``bn_splits: 1`` is plain BN (the demo: "analogous to SyncBatchNorm").
- ``symmetric`` (demo option, off by default as in the paper): also the loss with the
  views swapped, summed (the demo's loss_12 + loss_21), both key batches enqueued.
- Everything needed to resume exactly (key encoder, queue and its pointer) lives in
  the module's state_dict, so the loop's checkpoint carries it.

Official values: ImageNet (v2): ResNet-50, K 65536, m 0.999, T 0.2, batch 256,
lr 0.03, weight decay 1e-4, 200 epochs cosine, crop scale (0.2, 1), jitter
[0.4, 0.4, 0.4, 0.1] p 0.8, grayscale 0.2, blur p 0.5, flip. CIFAR-10 demo:
ResNet-18, K 4096, m 0.99, T 0.1, linear head (dim 128), batch 512, lr 0.06,
weight decay 5e-4, 200 epochs cosine, bn_splits 8, no blur; kNN monitor k 200,
t 0.1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from selfsup.core import dist
from selfsup.core.config import ConfigError, non_negative, one_of, positive
from selfsup.engine.config import TrainCfg
from selfsup.losses.contrastive import info_nce
from selfsup.models.heads import EvalHead, HEADS, l2n, projection_head, proj_spec
from selfsup.methods import register
from selfsup.engine.contract import Batch, Method, StepOut
from selfsup.models.momentum import KeyQueue, ema_update, frozen_copy, shuffled, split_batch_norm


@dataclass
class MoCoCfg(TrainCfg):
    # MoCo v2 ImageNet defaults (main_moco.py --mlp --moco-t 0.2 --aug-plus --cos)
    epochs: int = 200
    batch_size: int = 256
    lr: float = 0.03
    weight_decay: float = 1e-4
    augment: str = "crop_flip"
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    lr_schedule: str = "cosine"
    schedule_unit: str = "epoch"  # official adjust_learning_rate: once per epoch
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5  # aug+; the CIFAR demo has no blur
    queue_size: int = 65536  # CIFAR demo: 4096
    m: float = 0.999  # CIFAR demo: 0.99
    temperature: float = 0.2  # v2 (v1 and the CIFAR demo: 0.07 / 0.1)
    head: str = "mlp"  # v2 (v1 and the CIFAR demo: linear)
    hidden_dim: int = 0  # 0: the backbone's dimension (official)
    dim: int = 128
    bn_splits: int = 8  # one-device Shuffle-BN emulation (demo: 8; 1 = plain BN)
    shuffle_bn: bool = True  # permute the key batch (demo: _batch_shuffle_single_gpu)
    symmetric: bool = False  # demo option; paper: asymmetric

    def check(self, p: str) -> None:
        super().check(p)
        positive(p, self, "queue_size", "temperature", "dim", "bn_splits")
        non_negative(p, self, "hidden_dim")
        one_of(p, "head", self.head, HEADS)
        if not 0.0 <= self.m < 1.0:
            raise ConfigError(f"{p}.m: momentum in [0, 1), got {self.m}")
        if self.bn_splits > self.batch_size:
            raise ConfigError(f"{p}.bn_splits: {self.bn_splits} splits of a batch of {self.batch_size}")


@register
class MoCo(Method):
    name = "moco"
    Config = MoCoCfg
    views = 2

    def __init__(self, backbone: Any, cfg: MoCoCfg, num_classes: int):
        if cfg.bn_splits > 1 and dist.world() == 1:  # same weights and keys: the saved backbone is a plain one
            split_batch_norm(backbone, cfg.bn_splits)
        super().__init__(backbone, cfg, num_classes)
        self.head = projection_head(cfg.head, backbone.out_dim, cfg.dim, cfg.hidden_dim)
        # key encoder: a copy of the query encoder (official init), never optimised
        self.key_backbone = frozen_copy(self.backbone)
        self.key_head = frozen_copy(self.head)
        self.queue = KeyQueue(cfg.queue_size, cfg.dim)
        self._pending: torch.Tensor | None = None  # this step's keys, enqueued after the step

    def eval_head(self) -> EvalHead:
        # the official CIFAR demo's kNN monitor reads the query encoder's normalised output (fc included)
        c = self.cfg
        return EvalHead({"proj": proj_spec(c.head, self.backbone.out_dim, c.dim, c.hidden_dim), "l2": True},
                        self.head)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        return l2n(self.head(self.backbone(x)))  # (B, dim)

    def _key_net(self, x: torch.Tensor) -> torch.Tensor:
        return l2n(self.key_head(self.key_backbone(x)))  # (B, dim)

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cfg.shuffle_bn:
            return self._key_net(x)
        if dist.world() == 1:
            return shuffled(self._key_net, x)
        b, r = len(x), dist.rank()
        x_all = dist.all_gather(x)  # (W B, C, H, W), rank order
        perm = dist.broadcast(torch.randperm(len(x_all), device=x.device))  # rank 0's permutation
        k = dist.all_gather(self._key_net(x_all[perm[r * b:(r + 1) * b]]))  # (W B, D), in shuffled order
        return k[torch.argsort(perm)][r * b:(r + 1) * b]  # un-shuffled: this rank's keys

    def forward(self, batch: Batch) -> StepOut:
        c = self.cfg
        x1, x2 = batch.views  # (B, C, H, W) each
        q1 = self._query(x1).float()
        k2 = self._keys(x2).float()
        queue = self.queue.keys  # (K, D) negatives; this batch's keys are enqueued after the backward pass
        loss = info_nce(q1, k2, queue, c.temperature)
        keys = k2
        if c.symmetric:
            k1 = self._keys(x1).float()
            loss = loss + info_nce(self._query(x2).float(), k1, queue, c.temperature)
            keys = torch.cat([k1, k2])  # the demo enqueues both key batches
        self._pending = dist.all_gather(keys)  # every rank enqueues the keys of all ranks
        with torch.no_grad():
            pos_sim = (q1 * k2).sum(1).mean()
        return StepOut(loss, {"pos_sim": pos_sim})

    @torch.no_grad()
    def on_after_step(self, stepped: bool) -> None:
        c = self.cfg
        if stepped:  # the query encoder changed: the key encoder follows (Eq. 2)
            ema_update(self.key_backbone, self.backbone, c.m)
            ema_update(self.key_head, self.head, c.m)
        if self._pending is not None:
            self.queue.enqueue(self._pending)
        self._pending = None

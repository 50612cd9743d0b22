"""DeepCluster-v2 (Caron et al., NeurIPS 2020, the SwAV paper: DeepCluster (Caron et al., ECCV 2018)
rebuilt with SwAV's training improvements, described in the paper's appendix section on
DeepCluster-v2 and SeLa-v2 and compared in its table of clustering methods with and without
multi-crop). Official code: facebookresearch/swav, ``main_deepclusterv2.py`` (read for this file;
nothing copied).

- Network: as SwAV's (``selfsup.methods.swav``): backbone -> projection head Linear(hidden) -> BN ->
  ReLU -> Linear(``feat_dim``) -> L2 normalisation -> one bias-free linear of K_h prototypes per
  entry of ``prototypes`` (official ``--nmb_prototypes 3000 3000 3000``: three k-means heads).
- Memory (official ``init_memory`` / the update after each step): the L2-normalised embeddings of the
  ``crops_for_assign`` crops (the two large crops) of every training image, one (N, feat_dim) bank per
  crop, each row written with the embedding the image got the last time it was trained on (computed
  before that optimiser step, as the official code). Before the first epoch the banks are filled by one
  pass over the training split with the train augmentations, the model in train mode, under no_grad,
  each assigned crop forwarded on its own (official ``init_memory``; ``TrainContext.augmented_batches``).
- Clustering at the start of every epoch (official ``cluster_memory``): for head h, spherical k-means
  (``spherical_kmeans``) on bank h mod A: centroids initialised with K_h distinct random embeddings,
  ``kmeans_iters`` = 10 iterations of (assign each embedding to the centroid of largest dot product;
  each centroid <- the mean of its embeddings, re-normalised to unit length), then a last assignment.
  Empty clusters (official handling): a centroid whose cluster is empty keeps its previous value. The
  prototypes of head h are set to the centroids and the assignments are the epoch's targets.
- Loss: for each head, the cross-entropy of every crop's scores / ``temperature`` (0.1) against the
  assignment of its image, averaged over the crops of the batch, then over the heads
  (``deepclusterv2_loss``); images with no memory row (official: -100) are ignored.
- Prototypes are not trained in the official recipe: ``--freeze_prototypes_niters 300000`` is more than
  the 800 x 313 optimiser steps of its run (``freeze_prototypes_iters``: the same mechanism as SwAV's,
  ``selfsup.models.prototypes.PrototypeFreeze``); they are reset to the centroids every epoch anyway.
- Several processes (official: distributed k-means): each rank clusters its own contiguous share of
  the bank rows (``dist.shard``), the per-iteration centroid sums and counts are all-reduced, and the
  assignments are all-gathered. Two differences: (1) the official memory is per process (the rows of
  the images that process trained on); here the bank is one buffer of all N images, kept identical
  on every rank by gathering each step's embeddings (so it is checkpointed with the model and a run
  resumes with another number of processes), and each rank clusters its share of its rows; (2) the
  official initial centroids are random rows of rank 0's memory, broadcast; here they are random rows
  of the whole bank drawn from a generator seeded by (run seed, epoch, head), the same on every rank,
  each row sent by the rank that holds it, so the result does not depend on the number of processes:
  W ranks give the k-means of one process on the concatenated rows (sums in float64, so that the
  order in which shards are added only changes the last bits).
- Official ImageNet (``scripts/deepclusterv2_800ep_pretrain.sh``): ResNet-50, 2 x 224 + 6 x 96 crops,
  batch 4096, LARC over SGD (base lr 4.8, final 0.0048, 10 warm-up epochs from 0.3), weight decay
  1e-6, 3 x 3000 prototypes, feat_dim 128, hidden 2048, temperature 0.1, 800 epochs.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from selfsup.core import dist
from selfsup.augment.batched import ViewSpec
from selfsup.core.config import ConfigError, positive
from selfsup.data.prepared import Data
from selfsup.cluster.spherical_kmeans import spherical_kmeans
from selfsup.losses.prototypes import IGNORE, deepclusterv2_loss
from selfsup.models.heads import projection_head
from selfsup.core.io import derive_seed
from selfsup.methods import register
from selfsup.engine.contract import Batch, EpochPlan, Method, StepOut, TrainContext
from selfsup.cluster.metrics import nmi
from selfsup.models.prototypes import PrototypeFreeze, embed_crops, multicrop_specs, normalise_rows_, state_int
from selfsup.engine.config import MultiCropCfg


@dataclass
class DeepClusterV2Cfg(MultiCropCfg):
    prototypes: list[int] = field(default_factory=lambda: [3000, 3000, 3000])  # official nmb_prototypes
    kmeans_iters: int = 10  # official nmb_kmeans_iters
    freeze_prototypes_iters: int = 300_000  # official script: never trained within its 800 epochs

    def check(self, p: str) -> None:
        super().check(p)
        positive(p, self, "kmeans_iters")
        if not self.prototypes or any(k < 1 for k in self.prototypes):
            raise ConfigError(f"{p}.prototypes: a non-empty list of cluster counts >= 1, got {self.prototypes}")


# --------------------------------------------------------------------------- the method
@register
class DeepClusterV2(Method):
    name = "deepclusterv2"
    Config = DeepClusterV2Cfg

    def __init__(self, backbone: Any, cfg: DeepClusterV2Cfg, num_classes: int, n_train: int = 0):
        super().__init__(backbone, cfg, num_classes)
        self.projector = projection_head("mlp", backbone.out_dim, cfg.feat_dim, cfg.proj_hidden, bn=True)
        self.prototypes = nn.ModuleList(nn.Linear(cfg.feat_dim, k, bias=False) for k in cfg.prototypes)
        for p in self.prototypes:  # replaced by the centroids before the first step
            normalise_rows_(p)
        a, h = len(cfg.crops_for_assign), len(cfg.prototypes)
        self.register_buffer("memory", torch.zeros(a, n_train, cfg.feat_dim))  # (A, N, D) unit rows; 0: none yet
        self.register_buffer("assignments", torch.full((h, n_train), IGNORE, dtype=torch.long))  # (H, N)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.freeze = PrototypeFreeze(list(self.prototypes), cfg.freeze_prototypes_iters)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (B,) idx, (A, B, D) embeddings
        self._steps = state_int(self, "steps_done")

    @classmethod
    def from_data(cls, backbone: Any, cfg: DeepClusterV2Cfg, data: Data) -> "DeepClusterV2":
        return cls(backbone, cfg, data.num_classes, n_train=data.n_train)

    @classmethod
    def validate(cls, cfg: DeepClusterV2Cfg, data: Data, feat_dim: int) -> None:
        if max(cfg.prototypes) > data.n_train:
            raise ConfigError(f"deepclusterv2.prototypes: {max(cfg.prototypes)} clusters but only "
                              f"{data.n_train} training images")

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().load_checkpoint_state(state)
        self._steps = state_int(self, "steps_done")

    def view_specs(self) -> list[ViewSpec]:
        return multicrop_specs(self.cfg)

    # ------------------------------------------------------------------ memory and clustering
    @torch.no_grad()
    def init_memory(self, ctx: TrainContext) -> None:
        """Official ``init_memory``: one pass over the training split (train augmentations of the
        large crops, train mode, no gradient), each assigned crop forwarded on its own."""
        c = self.cfg
        self.train()
        large = dataclasses.replace(multicrop_specs(c)[0], count=c.n_large)
        idx, emb = [], []
        for batch in ctx.augmented_batches([large], derive_seed(ctx.seed, "deepclusterv2-init-memory"),
                                           batch_size=c.batch_size):
            idx.append(batch.idx)
            emb.append(torch.stack([embed_crops(self.backbone, self.projector, [batch.views[k]])
                                    for k in c.crops_for_assign], dim=1))  # (B, A, D)
        rows = dist.all_gather_varlen(torch.cat(idx))  # ranks hold different counts: gather once
        self.memory[:, rows] = dist.all_gather_varlen(torch.cat(emb)).transpose(0, 1)  # (A, n, D)

    @torch.no_grad()
    def cluster(self, epoch: int, ctx: TrainContext) -> dict[str, float]:
        c = self.cfg
        n = self.memory.shape[1]
        sl = dist.shard(n)  # this rank's share of the bank rows
        y = ctx.data.train.y
        labelled = y >= 0
        nmis, empty, objective = [], 0.0, []
        for h, k in enumerate(c.prototypes):
            bank = self.memory[h % len(c.crops_for_assign), sl]  # (n_r, D)
            have = bank.abs().sum(dim=1) > 0  # rows an image has written
            g = torch.Generator().manual_seed(derive_seed(ctx.seed, "deepclusterv2-kmeans", epoch, h))
            res = spherical_kmeans(bank[have], k, c.kmeans_iters, g)
            self.prototypes[h].weight.copy_(res.centroids)
            local = torch.full((len(bank),), IGNORE, dtype=torch.long, device=bank.device)
            local[have] = res.assign
            self.assignments[h] = dist.all_gather_varlen(local)  # shards in rank order = index order
            empty += float((res.counts == 0).sum())
            objective.append(res.objective)
            if labelled.any():
                a = self.assignments[h].cpu().numpy()
                nmis.append(nmi(y[labelled], a[labelled]))
        out = {"kmeans_objective": float(np.mean(objective)), "empty_clusters": empty}
        if nmis:
            out["nmi_labels"] = float(np.mean(nmis))
        return out

    def on_epoch_start(self, epoch: int, ctx: TrainContext) -> EpochPlan:
        self.freeze.reset = ctx.reset_optimizer_state
        t0 = time.perf_counter()
        if epoch == 0:
            self.init_memory(ctx)
        t1 = time.perf_counter()
        metrics = self.cluster(epoch, ctx)
        metrics.update(memory_seconds=t1 - t0, kmeans_seconds=time.perf_counter() - t1)
        return EpochPlan(metrics=metrics)

    def on_resume(self, ctx: TrainContext) -> None:
        self.freeze.reset = ctx.reset_optimizer_state

    # ------------------------------------------------------------------ loss
    def forward(self, batch: Batch) -> StepOut:
        c = self.cfg
        b = batch.views[0].shape[0]
        self.freeze.before_step(self._steps)
        z = embed_crops(self.backbone, self.projector, batch.views)  # (V B, D), unit rows
        scores = [head(z).float() for head in self.prototypes]  # per head (V B, K_h)
        loss = deepclusterv2_loss(scores, self.assignments[:, batch.idx], c.temperature)
        if self.training:
            self._pending = (batch.idx, torch.stack([z[k * b:(k + 1) * b].detach() for k in c.crops_for_assign]))
        return StepOut(loss)

    @torch.no_grad()
    def on_after_step(self, stepped: bool) -> None:
        if self._pending is not None:  # every batch's embeddings go to the memory (official)
            idx, z = self._pending  # (B,), (A, B, D)
            rows = dist.all_gather(idx)  # training batches have one size on every rank
            self.memory[:, rows] = dist.all_gather(z.transpose(0, 1).contiguous()).transpose(0, 1)
            self._pending = None
        if stepped:
            self.freeze.after_step(self._steps)
            self._steps += 1
            self.steps_done.fill_(self._steps)

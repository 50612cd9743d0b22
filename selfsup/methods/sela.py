"""SeLa: self-labelling via simultaneous clustering and representation learning
(Asano, Rupprecht, Vedaldi; ICLR 2020), as the paper and the official code
(yukimasano/self-label) do it.

- ``heads`` linear heads of ``clusters`` outputs on the backbone features (the
  paper's "10x3k" for ImageNet; 10 x 128 in the official CIFAR script), initialised as the
  official code's top layers: weights N(0, 0.01), zero bias. The loss is
  the mean cross-entropy over heads against each head's own labels (sec. 3.1, 3.4).
- Labels start as a random equal partition per head (official init), and are
  re-assigned ``relabel_times`` times over training by Sinkhorn-Knopp under the
  equal-partition constraint: Q = diag(a) P^lam diag(b), labels = argmax per row
  (sec. 3.1, Eq. 4-7; ``selfsup.cluster.sinkhorn``).
- When: the official code fires the j-th optimisation after (epochs + 1.0001) * s_j
  epochs of data, s = linspace(0, 1, relabel_times) (CIFAR: ``linear``) or its
  square (ImageNet: ``quadratic``, denser early). Our loop re-labels at epoch
  starts, so an optimisation fires at the first epoch start at or after its time;
  two falling in one epoch merge into one.
- Which heads: the ImageNet code solves every head at each optimisation
  (``relabel_heads: all``, default); the CIFAR code solves one head per
  optimisation, round-robin by epoch (``one``).
- Activations for a re-assignment: the official code runs the *training* loader
  (shuffled; train-mode model, so batch norm uses batch statistics and updates its running
  averages; train augmentations) under no_grad. That is the default
  (``relabel_features: train``; the batches are shuffled as the official loader's, so each
  batch mixes classes whatever the storage order, and the activations are put back in index
  order); ``eval`` uses the eval-mode model and eval transform, like DeepCluster.
- Several processes: each rank computes the activations of its share of the samples and holds
  those rows of log P; Sinkhorn-Knopp runs sharded, the cluster marginals all-reduced every
  iteration (``sinkhorn_knopp(..., sharded=True)``, as SwAV's ``distributed_sinkhorn``), and the
  labels of all ranks are gathered, so every rank holds the same labels.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from selfsup.core import dist
from selfsup.core.config import ConfigError, one_of, positive
from selfsup.engine.config import TrainCfg
from selfsup.data.prepared import Data
from selfsup.models.heads import EvalHead
from selfsup.core.io import derive_seed
from selfsup.methods import register
from selfsup.engine.contract import Batch, EpochPlan, Method, StepOut, TrainContext
from selfsup.cluster.metrics import nmi
from selfsup.cluster.sinkhorn import sinkhorn_knopp


@dataclass
class SeLaCfg(TrainCfg):
    heads: int = 10  # official CIFAR script: 10 (ImageNet: 10)
    clusters: int = 128  # official CIFAR script: 128 (ImageNet: 3000)
    lam: float = 10.0  # official CIFAR default 10 (ImageNet: 25)
    relabel_times: int = 400  # official "nopts" (CIFAR: 400 over 400 epochs)
    relabel_schedule: str = "linear"  # linear (CIFAR code) | quadratic (ImageNet code)
    relabel_heads: str = "all"  # all (ImageNet code) | one (CIFAR code: round-robin)
    relabel_features: str = "train"  # train (official: train loader, train mode) | eval
    sk_tol: float = 1e-6  # mean relative change of the per-sample scaling (see selfsup.cluster.sinkhorn)
    sk_max_iters: int = 10_000

    def check(self, p: str) -> None:
        super().check(p)
        positive(p, self, "heads", "clusters", "lam", "relabel_times", "sk_tol", "sk_max_iters")
        one_of(p, "relabel_schedule", self.relabel_schedule, ("linear", "quadratic"))
        one_of(p, "relabel_heads", self.relabel_heads, ("all", "one"))
        one_of(p, "relabel_features", self.relabel_features, ("train", "eval"))


def relabel_epochs(epochs: int, times: int, schedule: str) -> list[int]:
    """Epoch starts (0-based) at which labels are re-assigned, from the official schedule."""
    s = np.linspace(0.0, 1.0, times)
    if schedule == "quadratic":
        s = s**2
    t = (epochs + 1.0001) * s  # in epochs of data, as the official optimize_times / N
    return sorted({int(math.ceil(v - 1e-9)) for v in t if math.ceil(v - 1e-9) < epochs})


@register
class SeLa(Method):
    name = "sela"
    Config = SeLaCfg

    def __init__(self, backbone: Any, cfg: SeLaCfg, num_classes: int, n_train: int = 0):
        super().__init__(backbone, cfg, num_classes)
        # not in place: every head applies it to the same shared features
        act = [nn.ReLU()] if backbone.relu_head else []
        self.heads = nn.ModuleList(
            nn.Sequential(*act, nn.Linear(backbone.out_dim, cfg.clusters)) for _ in range(cfg.heads)
        )
        for h in self.heads:  # the official init of the top layers: N(0, 0.01), zero bias
            nn.init.normal_(h[-1].weight, 0.0, 0.01)
            nn.init.zeros_(h[-1].bias)
        self.register_buffer("labels", torch.zeros(cfg.heads, n_train, dtype=torch.long))  # (heads, N) self-labels

    def eval_head(self) -> EvalHead:
        # SeLa's kNN reads post-ReLU fc7 (alexnet_bn keeps fc7's ReLU in the head; other backbones
        # end in a ReLU / pooling already, so this is the backbone output)
        return EvalHead({"relu": bool(self.backbone.relu_head)})

    @classmethod
    def from_data(cls, backbone: Any, cfg: SeLaCfg, data: Data) -> "SeLa":
        return cls(backbone, cfg, data.num_classes, n_train=data.n_train)

    @classmethod
    def validate(cls, cfg: SeLaCfg, data: Data, feat_dim: int) -> None:
        if cfg.clusters > data.n_train:
            raise ConfigError(f"sela.clusters: {cfg.clusters} clusters but only {data.n_train} training images")

    # ------------------------------------------------------------------ labels
    @torch.no_grad()
    def _features(self, epoch: int, ctx: TrainContext) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the training split: (n_r,) indices, ascending, and their (n_r, D)
        backbone features (one process: all N, in index order)."""
        if self.cfg.relabel_features == "eval":
            sl = dist.shard(ctx.data.n_train)
            f = torch.from_numpy(ctx.extract(self.backbone, desc="sela features")[sl]).to(ctx.device)
            return torch.arange(sl.start, sl.stop, device=ctx.device), f
        self.backbone.train()  # official: activations from the (shuffled) training loader, train mode
        idx, out = [], []
        for batch in ctx.augmented_batches(self.view_specs(), derive_seed(ctx.seed, "sela-relabel", epoch)):
            idx.append(batch.idx)
            out.append(self.backbone(batch.x).float())
        order = torch.argsort(torch.cat(idx))
        return torch.cat(idx)[order], torch.cat(out)[order]

    def on_epoch_start(self, epoch: int, ctx: TrainContext) -> EpochPlan:
        cfg = self.cfg
        n = ctx.data.n_train
        if epoch == 0:  # official init: a random equal partition per head
            g = torch.Generator().manual_seed(derive_seed(ctx.seed, "sela-init"))
            base = torch.arange(n) % cfg.clusters
            self.labels.copy_(torch.stack([base[torch.randperm(n, generator=g)] for _ in range(cfg.heads)]))
        if epoch not in relabel_epochs(cfg.epochs, cfg.relabel_times, cfg.relabel_schedule):
            return EpochPlan()

        t0 = time.perf_counter()
        rows, feats = self._features(epoch, ctx)  # (n_r,), (n_r, D): this rank's samples
        t1 = time.perf_counter()
        todo = range(cfg.heads) if cfg.relabel_heads == "all" else [epoch % cfg.heads]
        iters, errs, nmi_prev, nmi_true, spread = [], [], [], [], []
        y = ctx.data.train.y
        labelled = y >= 0
        for h in todo:
            with torch.no_grad():
                log_p = torch.log_softmax(self.heads[h](feats).float(), dim=1)  # (n_r, clusters)
            # several processes: each rank holds its rows, the cluster marginals are all-reduced
            res = sinkhorn_knopp(log_p, cfg.lam, tol=cfg.sk_tol, max_iters=cfg.sk_max_iters, device=ctx.device,
                                 return_q=False, sharded=dist.world() > 1)
            new = torch.empty(n, dtype=torch.long, device=ctx.device)
            new[dist.all_gather_varlen(rows)] = dist.all_gather_varlen(res.labels.to(ctx.device))
            old = self.labels[h].cpu().numpy().copy()  # copy: on a CPU .numpy() shares memory with labels
            self.labels[h] = new
            new_np = new.cpu().numpy()
            iters.append(res.iterations)
            errs.append(res.marginal_error)
            nmi_prev.append(nmi(old, new_np))
            if labelled.any():
                nmi_true.append(nmi(y[labelled], new_np[labelled]))
            sizes = np.bincount(new_np, minlength=cfg.clusters)
            spread.append(sizes.std() / sizes.mean())
        t2 = time.perf_counter()
        metrics = {
            "relabel_heads": float(len(todo)),
            "sk_iterations": float(np.mean(iters)),
            "sk_marginal_error": float(np.max(errs)),
            "sk_seconds": t2 - t1,
            "features_seconds": t1 - t0,
            "nmi_prev": float(np.mean(nmi_prev)),
            "cluster_size_cv": float(np.mean(spread)),  # std/mean of cluster sizes; 0 = perfectly equal
        }
        if nmi_true:
            metrics["nmi_labels"] = float(np.mean(nmi_true))
        return EpochPlan(metrics=metrics)

    # ------------------------------------------------------------------ loss
    def forward(self, batch: Batch) -> StepOut:
        f = self.backbone(batch.x)  # (B, D)
        idx = batch.idx
        losses = [nn.functional.cross_entropy(head(f).float(), self.labels[h, idx]) for h, head in enumerate(self.heads)]
        loss = torch.stack(losses).mean()
        return StepOut(loss, {f"loss_head{h}": v.detach() for h, v in enumerate(losses)})

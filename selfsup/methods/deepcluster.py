"""DeepCluster (Caron, Bojanowski, Joulin, Douze; ECCV 2018), as the paper and the
official code (facebookresearch/deepcluster) do it.

Every epoch (sec. 3.2-3.3):
1. features of the whole training set, model in eval mode, eval transform;
2. PCA to ``pca_dim`` with whitening, then L2 normalisation;
3. faiss k-means into ``k`` clusters (20 iterations), a fresh seed per epoch
   derived from the run seed (the official code draws ``np.random.randint(1234)``);
4. cluster ids re-indexed over the non-empty clusters -> pseudo-labels;
5. an epoch's sample order that is uniform over clusters (``selfsup.cluster.sampler``);
6. a new linear head N(0, 0.01), zero bias, ``k`` outputs as the official code (empty
   clusters keep an output no sample targets), trained without momentum (the official
   ``optimizer_tl``; here a parameter group with momentum 0 whose optimiser state is cleared
   at every re-initialisation); the backbone keeps its momentum SGD across epochs;
7. one epoch of cross-entropy on the pseudo-labels with the train augmentations.

``reassign`` is the official ``--reassign``: an epoch draws ``reassign * N`` samples
between two clusterings.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from selfsup.core import dist
from selfsup.core.config import ConfigError, non_negative, one_of, positive
from selfsup.engine.config import TrainCfg
from selfsup.data.prepared import Data
from selfsup.core.io import derive_seed
from selfsup.cluster.kmeans import faiss_gpu, kmeans
from selfsup.methods import register
from selfsup.engine.contract import Batch, EpochPlan, Method, StepOut, TrainContext
from selfsup.cluster.metrics import nmi
from selfsup.engine.optim import param_groups
from selfsup.cluster.pca import pca_whiten
from selfsup.cluster.sampler import uniform_cluster_indices


@dataclass
class DeepClusterCfg(TrainCfg):
    sobel: bool = True  # official: --sobel on AlexNet (digits params: off, see params.yaml)
    k: int = 100  # paper (ImageNet): 10,000 = 10x the classes
    pca_dim: int = 256  # paper: 256
    # an epoch whose features have rank below pca_dim (a collapsing network) would stop a long run:
    # eigenvalues under pca_eig_floor x the largest are whitened as if they were that (faiss'
    # PCAMatrix has the same kind of epsilon; the official code runs faiss' PCA with none); 0 stops
    pca_eig_floor: float = 1e-6
    kmeans_iters: int = 20  # official: 20
    kmeans_init: str = "random"  # official: faiss' random seeding; kmeans++ as an option
    reassign: float = 1.0  # official --reassign: epochs of data between two clusterings
    head_std: float = 0.01  # official: top_layer.weight.normal_(0, 0.01)

    def check(self, p: str) -> None:
        super().check(p)
        positive(p, self, "k", "pca_dim", "kmeans_iters", "reassign", "head_std")
        non_negative(p, self, "pca_eig_floor")
        one_of(p, "kmeans_init", self.kmeans_init, ("random", "kmeans++"))


@register
class DeepCluster(Method):
    name = "deepcluster"
    Config = DeepClusterCfg

    def __init__(self, backbone: Any, cfg: DeepClusterCfg, num_classes: int, n_train: int = 0):
        super().__init__(backbone, cfg, num_classes)
        # the classifier on the pseudo-labels, re-initialised every epoch. Width k, as the official
        # code (nn.Linear(fd, len(images_lists)) = k: empty clusters keep a never-targeted output)
        self.head = nn.Linear(backbone.out_dim, cfg.k)
        self.act = nn.ReLU() if backbone.relu_head else nn.Identity()  # alexnet_bn: fc7's ReLU lives here
        self.register_buffer("pseudo", torch.zeros(n_train, dtype=torch.long))  # (N,) this epoch's pseudo-labels
        self.prev_assign: np.ndarray | None = None  # last epoch's clusters, for NMI(t, t-1)

    @classmethod
    def from_data(cls, backbone: Any, cfg: DeepClusterCfg, data: Data) -> "DeepCluster":
        return cls(backbone, cfg, data.num_classes, n_train=data.n_train)

    @classmethod
    def validate(cls, cfg: DeepClusterCfg, data: Data, feat_dim: int) -> None:
        n = data.n_train
        if cfg.k > n:
            raise ConfigError(f"deepcluster.k: {cfg.k} clusters but only {n} training images")
        if cfg.pca_dim > feat_dim:
            raise ConfigError(f"deepcluster.pca_dim: {cfg.pca_dim} is larger than the feature dimension {feat_dim}")
        if cfg.pca_dim >= n:
            raise ConfigError(f"deepcluster.pca_dim: {cfg.pca_dim} must be below the {n} training images")

    def samples_per_epoch(self, n_train: int) -> int:
        return int(round(self.cfg.reassign * n_train))

    def param_groups(self) -> list[dict[str, Any]]:
        # official: the backbone's momentum SGD persists across epochs; the top layer has its own
        # plain SGD (optimizer_tl: same lr and weight decay, no momentum), renewed every epoch
        c = self.cfg
        head = {id(p) for p in self.head.parameters()}
        groups = param_groups(self, c.weight_decay, c.exclude_norm_bias,
                              [p for p in self.parameters() if id(p) not in head])
        return [*groups, {"params": list(self.head.parameters()), "weight_decay": c.weight_decay, "momentum": 0.0}]

    def on_epoch_start(self, epoch: int, ctx: TrainContext) -> EpochPlan:
        cfg = self.cfg
        t0 = time.perf_counter()
        feats = ctx.extract(self.backbone, desc=f"deepcluster features ep{epoch}")  # (N, D), sharded extraction
        t1 = time.perf_counter()
        km = None
        if dist.is_main():  # PCA-whitening and k-means on the gathered features, the result broadcast
            x = pca_whiten(feats, cfg.pca_dim, eig_floor=cfg.pca_eig_floor, key="deepcluster.pca_dim")  # (N, pca_dim), unit rows
            km = kmeans(x, cfg.k, niter=cfg.kmeans_iters, seed=derive_seed(ctx.seed, "deepcluster-kmeans", epoch),
                        init=cfg.kmeans_init, gpu=ctx.device.type == "cuda" and faiss_gpu())
        km = dist.broadcast_object(km)
        t2 = time.perf_counter()
        order = uniform_cluster_indices(km.assign, self.samples_per_epoch(len(km.assign)),
                                        seed=derive_seed(ctx.seed, "deepcluster-sampler", epoch))
        self.pseudo.copy_(torch.from_numpy(km.assign.astype(np.int64)))

        # a new top layer each epoch (sec. 3.3 / official main.py): N(0, 0.01), zero bias, fresh optimiser state
        g = torch.Generator().manual_seed(derive_seed(ctx.seed, "deepcluster-head", epoch))
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) * cfg.head_std)
            self.head.bias.zero_()
        if ctx.reset_optimizer_state is not None:
            ctx.reset_optimizer_state(list(self.head.parameters()))

        m = int(len(np.unique(km.assign)))
        sizes = np.bincount(km.assign, minlength=cfg.k)
        sizes = sizes[sizes > 0]
        metrics = {
            "kmeans_objective": km.objective,
            "clusters_nonempty": float(m),
            "cluster_size_min": float(sizes.min()),
            "cluster_size_max": float(sizes.max()),
            "cluster_size_std": float(sizes.std()),
            "features_seconds": t1 - t0,
            "kmeans_seconds": t2 - t1,  # PCA + k-means
        }
        if self.prev_assign is not None:
            metrics["nmi_prev"] = nmi(self.prev_assign, km.assign)
        y = ctx.data.train.y
        if (y >= 0).any():
            metrics["nmi_labels"] = nmi(y[y >= 0], km.assign[y >= 0])
        self.prev_assign = km.assign
        return EpochPlan(order=order, metrics=metrics)

    def forward(self, batch: Batch) -> StepOut:
        logits = self.head(self.act(self.backbone(batch.x))).float()  # (B, k)
        return StepOut(nn.functional.cross_entropy(logits, self.pseudo[batch.idx]))

    def checkpoint_state(self) -> dict[str, Any]:
        return {"module": self.state_dict(), "prev_assign": self.prev_assign}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["module"])
        self.prev_assign = state["prev_assign"]

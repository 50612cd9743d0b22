"""MLCD: multi-label cluster discrimination (An, Yang, Dai, Feng, Deng; ECCV 2024), faithful to
the paper (its pre-training code is not public; the loss is in ``selfsup/losses/mlcd.py``).

Clustering step (sec. 3.1), once before training:
1. features of the training set from an *upstream* encoder (paper: off-the-shelf CLIP
   features of LAION-400M); here ``methods.mlcd`` in params.yaml: another method's final
   encoder ``data/models/<m>.pt`` (a DVC dependency), a local backbone file, or
   ``data/dataset`` for none = the freshly initialised backbone (the ``random`` encoder);
2. optional PCA-whitening to ``pca_dim`` + L2 (DeepCluster's preprocessing; the paper clusters
   the normalised embeddings directly: ``pca_dim: 0``);
3. faiss k-means into ``centres`` clusters (paper: one million, heavy over-clustering);
4. each image's top-``positives`` (l) nearest centres by cosine similarity are its positive
   labels; written with their similarities to ``data/pretrain/mlcd/assignment.parquet``.

Discrimination step (sec. 3.2): learnable class centres (``centre_init``: ``random`` as
PartialFC's N(0, 0.01), or the k-means centroids), cosine logits, the paper's multi-label loss
with scale and margin, and PartialFC negative sampling (``negative_ratio``). The backbone
trains from its seeded initialisation (paper: from scratch), not from the upstream encoder.

``recluster_every`` > 0 re-clusters the *current* model's features every that many epochs
(paper: never) and re-initialises the class centres (their SGD momentum carries over: the
method cannot reach the loop's optimiser; a documented simplification of an option the paper
does not have).

Resume: the assignment is reloaded from the parquet file and checked against the digest the
checkpoint recorded; a missing or different file stops the run with the path named.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from selfsup.core import dist
from selfsup.core.config import ConfigError, non_negative, one_of, positive
from selfsup.engine.config import TrainCfg
from selfsup.data.prepared import Data
from selfsup.core.io import InputError, atomic_path, derive_seed
from selfsup.cluster.kmeans import kmeans, topk_centroids
from selfsup.methods import register
from selfsup.engine.contract import Batch, EpochPlan, Method, StepOut, TrainContext
from selfsup.cluster.metrics import nmi
from selfsup.models.backbones import load_backbone
from selfsup.losses.mlcd import (MARGIN_GRADS, MARGINS, cosine_logits, multilabel_loss, positive_columns, sample_centres,
                               sharded_multilabel_loss, soft_label_loss, soft_targets)
from selfsup.cluster.pca import PCAWhitening

ASSIGNMENT = "assignment.parquet"
LOG_IMAGES = 8  # images of a batch the per-step pos_in_topl diagnostic looks at


@dataclass
class MLCDCfg(TrainCfg):
    # defaults are the paper's ImageNet-scale values; params.yaml has the digits ones
    centres: int = 1_000_000  # paper: 1M centres for LAION-400M (sec. 3.1)
    positives: int = 8  # l, top-l centres per image (paper's ablation: best at l = 8)
    pca_dim: int = 0  # 0: cluster the L2-normalised features (paper); else PCA-whiten to this first
    kmeans_iters: int = 20
    kmeans_init: str = "random"  # faiss' seeding | kmeans++
    centre_init: str = "random"  # random: N(0, 0.01) (PartialFC) | kmeans: the k-means centroids
    loss: str = "mlcd"  # mlcd: the paper's loss | soft: soft-label cross-entropy
    scale: float = 64.0  # s (PartialFC / UNICOM default)
    margin: float = 0.3  # m on the positives (UNICOM's ArcFace margin)
    margin_type: str = "arc"  # arc: cos(theta + m) (UNICOM's CombinedMarginLoss m2) | cosine: cos - m
    # the margin's gradient: straight_through as UNICOM's code (margin applied under no_grad: the
    # gradient of the plain cosine) | exact (the derivative of the margin function)
    margin_grad: str = "straight_through"
    negative_ratio: float = 0.1  # r, fraction of negative centres sampled per step (paper: 0.1)
    soft_temperature: float = 0.1  # loss soft: target weights softmax(sim / T) over the top-l
    recluster_every: int = 0  # 0: cluster once (paper); n: re-cluster the current model every n epochs
    # several processes: each rank holds 1/W of the class centres and the loss's sums over them are
    # distributed (PartialFC's model parallelism, for a million centres); false: replicated centres
    shard_centres: bool = False

    def check(self, p: str) -> None:
        super().check(p)
        positive(p, self, "centres", "positives", "kmeans_iters", "scale", "negative_ratio", "soft_temperature")
        non_negative(p, self, "pca_dim", "margin", "recluster_every")
        one_of(p, "kmeans_init", self.kmeans_init, ("random", "kmeans++"))
        one_of(p, "centre_init", self.centre_init, ("random", "kmeans"))
        one_of(p, "loss", self.loss, ("mlcd", "soft"))
        one_of(p, "margin_type", self.margin_type, MARGINS)
        one_of(p, "margin_grad", self.margin_grad, MARGIN_GRADS)
        if self.negative_ratio > 1.0:
            raise ConfigError(f"{p}.negative_ratio: a fraction in (0, 1], got {self.negative_ratio}")
        if self.positives > self.centres:
            raise ConfigError(f"{p}.positives: {self.positives} positives but only {self.centres} centres")
        if self.shard_centres and self.loss != "mlcd":
            raise ConfigError(f"{p}.shard_centres: sharded centres implement the paper's loss (loss: mlcd), "
                              f"got loss: {self.loss}")


def write_assignment(path: Path, ids: np.ndarray, sims: np.ndarray, epoch: int, digest: str) -> None:
    """Parquet: ``index`` int64, ``centres`` list<int64>[l], ``similarities`` list<float32>[l]."""
    n, l = ids.shape
    table = pa.table({
        "index": np.arange(n, dtype=np.int64),
        "centres": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1).astype(np.int64)), l),
        "similarities": pa.FixedSizeListArray.from_arrays(pa.array(sims.reshape(-1).astype(np.float32)), l),
    }).replace_schema_metadata({"epoch": str(epoch), "digest": digest})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_assignment(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Inverse of ``write_assignment``: ids (N, l) int64, sims (N, l) float32, digest."""
    if not path.is_file():
        raise InputError(f"{path}: missing")
    try:
        t = pq.read_table(path)
        ids_col, sims_col = t.column("centres").combine_chunks(), t.column("similarities").combine_chunks()
        l = ids_col.type.list_size
        ids = ids_col.flatten().to_numpy().reshape(-1, l).astype(np.int64)
        sims = sims_col.flatten().to_numpy().reshape(-1, l).astype(np.float32)
        digest = t.schema.metadata[b"digest"].decode()
    except (pa.ArrowInvalid, KeyError, OSError, TypeError) as e:
        raise InputError(f"{path}: corrupt assignment file ({e})") from e
    return ids, sims, digest


def positive_label_purity(ids: np.ndarray, y: np.ndarray, n_centres: int) -> float:
    """Fraction of the positives (N, l) whose centre's majority label (over the images whose
    top-1 centre it is) is the image's own label y (N,): how clean the multi-labels are.
    Sparse (no centres x classes table), so it stays cheap at a million centres."""
    k = int(y.max()) + 1
    codes, cnt = np.unique(ids[:, 0] * k + y, return_counts=True)  # (centre, label) pairs
    cen, lab = codes // k, codes % k
    order = np.lexsort((-cnt, cen))  # by centre, most frequent label first
    cen_u, first = np.unique(cen[order], return_index=True)
    maj = np.full(n_centres, -1)
    maj[cen_u] = lab[order][first]
    return float((maj[ids] == y[:, None]).mean())


def assignment_digest(ids: np.ndarray, sims: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(ids, np.int64).tobytes())
    h.update(np.ascontiguousarray(sims, np.float32).tobytes())
    return h.hexdigest()[:16]


@register
class MLCD(Method):
    name = "mlcd"
    Config = MLCDCfg
    uses_upstream = True

    def __init__(self, backbone: Any, cfg: MLCDCfg, num_classes: int):
        super().__init__(backbone, cfg, num_classes)
        # (centres, D) learnable class centres; PartialFC's init N(0, 0.01), drawn right after the
        # seeded backbone init (so reproducible). Sharded: this rank's rows [lo, lo + C_r) of the
        # same draw (the full draw once: a million x 512 floats is 2 GB for a moment)
        full = torch.randn(cfg.centres, backbone.out_dim) * 0.01
        self.sharded = cfg.shard_centres and dist.world() > 1
        sl = dist.shard(cfg.centres) if self.sharded else slice(0, cfg.centres)
        self.centre_lo = sl.start
        self.centres = nn.Parameter(full[sl].clone())
        if self.sharded:  # DDP leaves this rank-local parameter alone; the loss gives it W x its gradient
            self.centres.register_hook(lambda g: g / dist.world())
        self.pos = torch.zeros(0, 0, dtype=torch.long)  # (N, l) positive centre ids per image
        self.sims = torch.zeros(0, 0)  # (N, l) their cosine similarities (k-means space)
        self.digest = ""  # of the assignment in use; checked against the parquet on resume
        self.clustered_at = -1  # epoch of the last clustering

    @classmethod
    def validate(cls, cfg: MLCDCfg, data: Data, feat_dim: int) -> None:
        n = data.n_train
        if cfg.centres > n:
            raise ConfigError(f"mlcd.centres: {cfg.centres} centres but only {n} training images")
        if cfg.pca_dim >= n:
            raise ConfigError(f"mlcd.pca_dim: {cfg.pca_dim} must be below the {n} training images")
        if cfg.centre_init == "kmeans" and cfg.pca_dim not in (0, feat_dim):
            raise ConfigError(f"mlcd.centre_init: kmeans needs the centroids in the {feat_dim}-d embedding space; "
                              f"set pca_dim 0 or {feat_dim}, got {cfg.pca_dim}")

    # ------------------------------------------------------------------ clustering
    def _encoder(self, epoch: int, ctx: TrainContext) -> nn.Module:
        if epoch > 0 or ctx.upstream is None:
            return self.backbone  # re-clustering, or no upstream: the model being trained
        return load_backbone(ctx.upstream, ctx.device)

    def _cluster(self, epoch: int, ctx: TrainContext) -> dict[str, float]:
        cfg, data = self.cfg, ctx.data
        t0 = time.perf_counter()
        enc = self._encoder(epoch, ctx)
        try:
            feats = ctx.extract(enc, desc=f"mlcd features ep{epoch}")  # (N, D')
        except RuntimeError as e:  # e.g. an upstream encoder built for other channels / sizes
            raise InputError(f"{ctx.upstream}: upstream encoder of mlcd does not take this dataset's images ({e})") \
                from e
        # several processes: the whitening and k-means on rank 0 (broadcast), the top-l assignment
        # sharded (each rank its rows against the centroids), gathered
        pca = None
        if cfg.pca_dim and dist.is_main():
            try:
                pca = PCAWhitening.fit(feats, cfg.pca_dim, key="mlcd.pca_dim")
            except ValueError as e:
                raise ConfigError(str(e)) from e
        pca = dist.broadcast_object(pca)
        sl = dist.shard(len(feats))
        x = pca.transform(feats) if pca is not None else \
            feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12)  # (N, d), unit rows
        t1 = time.perf_counter()
        km = None
        if dist.is_main():
            km = kmeans(x, cfg.centres, niter=cfg.kmeans_iters, seed=derive_seed(ctx.seed, "mlcd-kmeans", epoch),
                        init=cfg.kmeans_init)
        km = dist.broadcast_object(km)
        ids, sims = topk_centroids(x[sl], km.centroids, cfg.positives)  # (n_r, l) each, this rank's rows
        if dist.world() > 1:
            ids = dist.all_gather_varlen(torch.from_numpy(ids).to(ctx.device)).cpu().numpy()
            sims = dist.all_gather_varlen(torch.from_numpy(sims).to(ctx.device)).cpu().numpy()
        t2 = time.perf_counter()
        self.digest = assignment_digest(ids, sims)
        self.clustered_at = epoch
        if ctx.work_dir is not None and dist.is_main():
            write_assignment(Path(ctx.work_dir) / ASSIGNMENT, ids, sims, epoch, self.digest)
        self._set_assignment(ids, sims, ctx.device)

        with torch.no_grad():
            if cfg.centre_init == "kmeans":
                if epoch == 0 and ctx.upstream is not None:
                    raise ConfigError(
                        f"mlcd.centre_init: kmeans copies the k-means centroids into the class centres, but they are "
                        f"in the upstream encoder's feature space ({ctx.upstream}), not the trained embedding's; "
                        f"use centre_init: random, or methods.mlcd: data/dataset (cluster the model's own features)")
                c = torch.from_numpy(km.centroids)  # (centres, d)
                if c.shape[1] != self.centres.shape[1]:
                    raise ConfigError(f"mlcd.centre_init: kmeans centroids are {c.shape[1]}-d but the embedding is "
                                      f"{self.centres.shape[1]}-d (the upstream encoder differs); use random")
                self.centres.copy_(nn.functional.normalize(c, dim=1)[self._rows()])
            elif epoch > 0:  # re-clustering: the old centres stand for other clusters
                g = torch.Generator().manual_seed(derive_seed(ctx.seed, "mlcd-centres", epoch))
                self.centres.copy_((torch.randn(cfg.centres, self.centres.shape[1], generator=g) * 0.01)[self._rows()])
        top1 = ids[:, 0]
        metrics = {
            "kmeans_objective": km.objective,
            "clusters_nonempty": float(len(np.unique(top1))),
            "positive_sim_mean": float(sims.mean()),
            "features_seconds": t1 - t0,
            "kmeans_seconds": t2 - t1,
        }
        y = data.train.y
        if (y >= 0).any():
            metrics["nmi_labels"] = nmi(y[y >= 0], top1[y >= 0])
            # label purity of the positives: fraction of an image's l centres whose top-1 majority
            # label is its own label (how clean the multi-labels are)
            metrics["positive_label_purity"] = positive_label_purity(ids[y >= 0], y[y >= 0], cfg.centres)
        return metrics

    def _rows(self) -> slice:
        """This rank's rows of the centres (all of them unless sharded)."""
        return slice(self.centre_lo, self.centre_lo + self.centres.shape[0])

    def rank_local_params(self) -> list[str]:
        return ["centres"] if self.sharded else []

    def _set_assignment(self, ids: np.ndarray, sims: np.ndarray, device: torch.device) -> None:
        self.pos = torch.from_numpy(ids).to(device)
        self.sims = torch.from_numpy(sims).to(device)

    def _reload(self, ctx: TrainContext) -> None:
        """Resume: the assignment the checkpoint trained on, from the parquet file."""
        path = Path(ctx.work_dir or ".") / ASSIGNMENT
        ids, sims, digest = read_assignment(path)
        if digest != self.digest or assignment_digest(ids, sims) != self.digest:
            raise InputError(f"{path}: not the assignment this checkpoint trained on (digest {digest}, "
                             f"expected {self.digest}); delete {path.parent} to start fresh")
        self._set_assignment(ids, sims, ctx.device)

    def on_epoch_start(self, epoch: int, ctx: TrainContext) -> EpochPlan:
        cfg = self.cfg
        recluster = epoch == 0 or (cfg.recluster_every > 0 and epoch % cfg.recluster_every == 0)
        if recluster:
            return EpochPlan(metrics=self._cluster(epoch, ctx))
        return EpochPlan()

    def on_resume(self, ctx: TrainContext) -> None:
        if self.digest:  # clustered before the checkpoint: the assignment is on disk
            self._reload(ctx)

    # ------------------------------------------------------------------ loss
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)  # (B, D)
        return torch.relu(f) if self.backbone.relu_head else f  # alexnet_bn's final ReLU lives in the head

    def forward(self, batch: Batch) -> StepOut:
        cfg = self.cfg
        emb = self.embed(batch.x).float()  # (B, D)
        pos = self.pos[batch.idx]  # (B, l)
        if self.sharded:  # the global batch against this rank's centres; distributed sums
            per = sharded_multilabel_loss(emb, pos, self.centres, self.centre_lo, cfg.centres, cfg.negative_ratio,
                                          cfg.scale, cfg.margin, cfg.margin_type, cfg.margin_grad)  # (W B,)
            with torch.no_grad():
                hit = self._pos_in_topl_sharded(emb, pos)
            return StepOut(per.mean(), {"pos_in_topl": hit})
        index = sample_centres(pos, cfg.centres, cfg.negative_ratio)  # (M,) sorted
        cos = cosine_logits(emb, self.centres, index)  # (B, M)
        pcol = positive_columns(index, pos)  # (B, l)
        if cfg.loss == "mlcd":
            per = multilabel_loss(cos, pcol, cfg.scale, cfg.margin, cfg.margin_type, cfg.margin_grad)  # (B,)
        else:
            per = soft_label_loss(cos, pcol, soft_targets(self.sims[batch.idx], cfg.soft_temperature), cfg.scale)
        with torch.no_grad():  # fraction of the positives among the model's top-l of all centres, on the
            # batch's first LOG_IMAGES images: a diagnostic, not worth B x C cosines a step at a million centres
            e, p = emb[:LOG_IMAGES], pos[:LOG_IMAGES]
            top = cosine_logits(e, self.centres).topk(cfg.positives, dim=1).indices  # (b, l)
            hit = (top[:, :, None] == p[:, None, :]).any(2).float().mean()
        return StepOut(per.mean(), {"pos_in_topl": hit, "centres_sampled": torch.tensor(float(index.numel()))})

    def _pos_in_topl_sharded(self, emb: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """pos_in_topl over the shards: each rank's top-l of its centres, merged."""
        l, b = self.cfg.positives, min(len(emb), LOG_IMAGES)
        emb, pos = emb[:b], pos[:b]
        e = dist.all_gather(emb)  # (W b, D): every rank scores every image against its centres
        k = min(l, self.cfg.centres // dist.world())  # the same on every rank (shards differ by one)
        v, i = cosine_logits(e, self.centres).topk(k, dim=1)  # (W B, k)
        v_all = dist.all_gather(v[None]).reshape(dist.world(), len(e), -1)  # (W, W B, k)
        i_all = dist.all_gather((i + self.centre_lo)[None]).reshape(dist.world(), len(e), -1)
        top = torch.gather(i_all.permute(1, 0, 2).reshape(len(e), -1), 1,
                           v_all.permute(1, 0, 2).reshape(len(e), -1).topk(l, dim=1).indices)  # (W B, l)
        r = dist.rank()
        top = top[r * b:(r + 1) * b]
        return (top[:, :, None] == pos[:, None, :]).any(2).float().mean()

    def checkpoint_state(self) -> dict[str, Any]:
        # called on every rank: sharded centres are gathered, so the checkpoint holds all of them
        # (a run resumes with any number of processes, sharded or not)
        sd = self.state_dict()
        if self.sharded:
            sd["centres"] = dist.all_gather_varlen(self.centres.detach())
        return {"module": sd, "digest": self.digest, "clustered_at": self.clustered_at}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        sd = dict(state["module"])
        sd["centres"] = sd["centres"][self._rows()]
        self.load_state_dict(sd)
        self.digest, self.clustered_at = state["digest"], state["clustered_at"]
        self.pos = torch.zeros(0, 0, dtype=torch.long)  # reloaded at the next epoch start

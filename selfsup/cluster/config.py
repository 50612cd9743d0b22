"""The ``whiten:`` and ``cluster:`` sections: PCA-whitening of the final features and the k-means of the
clustering evaluation (``selfsup/cluster/pca.py``, ``kmeans.py``). Parsed when first read
(``selfsup.core.config.SECTIONS``)."""
from __future__ import annotations

from dataclasses import dataclass

from selfsup.core.config import non_negative, one_of, positive


@dataclass
class WhitenCfg:
    pca_dim: int = 32  # final-feature PCA-whitening before the cluster stage (capped at the features' rank)

    def check(self, p: str) -> None:
        positive(p, self, "pca_dim")


@dataclass
class ClusterCfg:
    k: int = 0  # 0: as many clusters as classes; 10 (at most one per image) on data without classes
    niter: int = 20
    nredo: int = 5  # restarts, keep the best objective (evaluation: less seed noise)
    init: str = "kmeans++"  # random (faiss) | kmeans++

    def check(self, p: str) -> None:
        non_negative(p, self, "k")
        positive(p, self, "niter", "nredo")
        one_of(p, "init", self.init, ("random", "kmeans++"))

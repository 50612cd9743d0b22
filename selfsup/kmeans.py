"""k-means with faiss (DeepCluster's official ``run_kmeans``), plus the re-indexing of
non-empty clusters."""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


@dataclass
class KMeansResult:
    assign: np.ndarray  # (N,) int64 cluster id per sample, in [0, k)
    centroids: np.ndarray  # (k, d) float32
    objective: float  # sum of squared distances to the assigned centroid (after the last update)
    iterations: list[float]  # faiss' objective per iteration (for the log)


def kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0, nredo: int = 1, gpu: bool = False,
           init: str = "random") -> KMeansResult:
    """Lloyd's k-means with faiss.

    As the official DeepCluster code: ``niter`` 20, ``max_points_per_centroid`` large
    so faiss never subsamples the data, an explicit seed, and faiss' own seeding
    (``init="random"``: k distinct random points). faiss splits big clusters to
    refill empty ones during training. ``init="kmeans++"`` seeds with scikit-learn's
    k-means++ instead (robust on well-separated data, where random seeding can
    leave two centres in one blob); faiss still runs the iterations.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)  # (N, d)
    n, d = x.shape
    if k > n:
        raise ValueError(f"k: {k} clusters asked for but only {n} points")
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    km = faiss.Kmeans(d, k, niter=niter, seed=int(seed), nredo=nredo, gpu=gpu, verbose=False,
                      max_points_per_centroid=10_000_000, min_points_per_centroid=1)
    if init == "random":
        km.train(x)
    elif init == "kmeans++":
        from sklearn.cluster import kmeans_plusplus

        best = None
        for r in range(nredo):  # nredo independent seedings; keep the lowest final objective
            c0, _ = kmeans_plusplus(x, k, random_state=int(seed) + r)
            km1 = faiss.Kmeans(d, k, niter=niter, seed=int(seed) + r, verbose=False, gpu=gpu,
                               max_points_per_centroid=10_000_000, min_points_per_centroid=1)
            km1.train(x, init_centroids=np.ascontiguousarray(c0, dtype=np.float32))
            if best is None or km1.obj[-1] < best.obj[-1]:
                best = km1
        km = best
    else:
        raise ValueError(f"init: unknown k-means seeding {init!r} (random | kmeans++)")
    dist, idx = km.index.search(x, 1)  # (N, 1) squared L2 distances to the nearest centroid
    return KMeansResult(idx[:, 0].astype(np.int64), km.centroids.copy(), float(dist.sum()),
                        [float(o) for o in km.obj])


def assign_to_centroids(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid (L2) for each row of x: (N, d), (k, d) -> (N,)."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return idx[:, 0].astype(np.int64)


def topk_centroids(x: np.ndarray, centroids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar centroids of each row of x, by cosine similarity (MLCD sec. 3.1:
    each image's top-l nearest cluster centres are its positive labels).

    Rows of x and the centroids are L2-normalised, then an exact faiss inner-product search
    (on unit vectors, the nearest centres by L2 and by cosine are the same).
    (N, d), (K, d) -> ids (N, k) int64 and similarities (N, k) float32, most similar first.
    """
    if not 1 <= k <= len(centroids):
        raise ValueError(f"k: need 1 <= k <= {len(centroids)} centroids, got {k}")
    x = np.ascontiguousarray(x, dtype=np.float32)  # (N, d)
    c = np.ascontiguousarray(centroids, dtype=np.float32)  # (K, d)
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
    c = c / (np.linalg.norm(c, axis=1, keepdims=True) + 1e-12)
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    sims, ids = index.search(x, k)  # (N, k) each, descending similarity
    return ids.astype(np.int64), sims.astype(np.float32)

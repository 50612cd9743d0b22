"""k-means with faiss (DeepCluster's official ``run_kmeans``), plus the re-indexing of
non-empty clusters.

Sharded k-means (features that do not fit one process): ``kmeans_sharded`` runs faiss'
Python k-means, ``faiss.contrib.clustering.kmeans``, on a ``ShardedDatasetAssign``: an
implementation of that module's ``DatasetAssign`` seam (``count``, ``dim``,
``get_subset``, ``assign_to``) over row shards held by the ranks of a torch.distributed
group (``selfsup.core.dist``; rank r's rows come after rank r-1's). The loop itself is faiss' own
and runs replicated on every rank; only the seam communicates:

- ``count()`` is the global N; ``get_subset(global_indices)`` (the random initial centroids)
  fills the rows this rank owns and all-reduces (max over -inf elsewhere: exact);
- ``assign_to(centroids)`` searches this rank's rows only (``faiss.knn``, as the contrib
  class) and all-reduces the per-centroid sums; the contract asks for the assignment and
  distances of all N rows (the loop counts cluster sizes and the objective from them), so
  those two (N,) vectors are all-gathered: 12 bytes a row per iteration against the N x d
  features that never move.

Independent of the number of ranks. The loop's random draws (initial rows, the splitting of
large clusters to refill empty ones, ``reassign_centroids``) come from ``RandomState(seed)``
on the global N and the global cluster sizes, so every rank draws the same. The centroid sums
are exact: every value is rounded once to a per-dimension fixed-point grid (a power of two,
from the global max |x| and N, leaving >= 62 - log2 N bits below the max) and summed in
int64, so the sums, and the centroids, do not depend on how the rows are split or in which
order they are added (float32 sums, as the contrib class does them, would). The search is
per row: faiss' BLAS path (taken for every shard, see ``_search``) accumulates each row's dot
products in an order that does not depend on where the row sits in its batch (bit-identical on
this OpenBLAS: tests/test_distributed.py checks it; not a documented BLAS guarantee, and where it fails only rows
with a near-exact tie between two centroids could flip). So with W ranks the centroids, the
assignment (concatenated in rank order) and the objective are those of W = 1 on the
concatenated rows, bit for bit in the tests' runs.

This is faiss' Python k-means, not the C++ ``faiss.Kmeans`` that ``kmeans`` runs (other
random stream for the initial centroids, float32 sums): ``kmeans_sharded`` at world size 1 is
a k-means of the same quality, not the same result as ``kmeans``.

The other functions work per shard unchanged: ``assign_to_centroids`` and
``topk_centroids`` treat each row on its own against (replicated) centroids, so calling them
on a rank's rows gives that rank's rows of the one-process answer.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

from typing import TYPE_CHECKING

import faiss
import numpy as np
from faiss.contrib import clustering as faiss_clustering

if TYPE_CHECKING:
    import torch

# torch and selfsup.core.dist are imported inside the sharded functions only: the kNN and cluster stages
# use the one-process k-means and should not pay torch's start-up (~1.6 s per stage: benchmarks/imports.py)


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

    Sharded features need no sharded version: each row is searched on its own against the
    (replicated) centroids, so each rank calls this on its own rows and gets its rows of the
    one-process answer (no communication).
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


# --------------------------------------------------------------------------------------------- #
# Sharded k-means (see the module docstring)
# --------------------------------------------------------------------------------------------- #
def _comm_device() -> "torch.device":
    """Where collective buffers live: the GPU with NCCL, the CPU otherwise (gloo)."""
    import torch

    from selfsup.core import dist

    if dist.is_dist() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_rows(a: np.ndarray) -> np.ndarray:
    """Every rank's (n_r, ...) array -> (N, ...) concatenated in rank order."""
    import torch

    from selfsup.core import dist

    if dist.world() == 1:
        return a
    return dist.all_gather_varlen(torch.from_numpy(np.ascontiguousarray(a)).to(_comm_device())).cpu().numpy()


def _all_reduce_np(a: np.ndarray, op: str) -> np.ndarray:
    import torch

    from selfsup.core import dist

    if dist.world() == 1:
        return a
    return dist.all_reduce(torch.from_numpy(np.ascontiguousarray(a)).to(_comm_device()), op).cpu().numpy()


class ShardedDatasetAssign(faiss_clustering.DatasetAssign):
    """faiss' ``DatasetAssign`` over the row shards of all ranks (module docstring).

    Every rank constructs it with its own (n_r, d) rows (n_r may be 0) and calls every method
    with the same arguments, in the same order (the methods are collective). Indices, weights
    and the returned assignments / distances are global (N rows, rank order), as the contract
    of ``faiss.contrib.clustering.kmeans`` asks; ``search_local`` is this rank's part.
    """

    _ROWS_PER_BLOCK = 1 << 16  # rows quantised at a time for the exact sums

    def __init__(self, x_shard: np.ndarray):
        x = np.asarray(x_shard)
        if x.ndim != 2:
            raise ValueError(f"x_shard must be 2-D (n_r, d), got shape {x.shape}")
        self.x = np.ascontiguousarray(x, dtype=np.float32)  # (n_r, d)
        sizes = _gather_rows(np.array([[len(self.x), self.x.shape[1]]], dtype=np.int64))  # (W, 2)
        if not (sizes[:, 1] == sizes[0, 1]).all():
            raise ValueError(f"x_shard: the ranks disagree on the dimension d: {sizes[:, 1].tolist()}")
        self.sizes = sizes[:, 0]  # (W,) rows per rank
        self.n = int(self.sizes.sum())  # global N
        from selfsup.core import dist

        self.offset = int(self.sizes[: dist.rank()].sum())  # global index of this rank's first row
        self._grid = None  # fixed-point exponents for the unweighted sums (global, cached)

    def count(self) -> int:
        return self.n

    def dim(self) -> int:
        return self.x.shape[1]

    def get_subset(self, indices) -> np.ndarray:
        """Global rows ``indices`` (any order, repeats allowed), (len, d) float32 on every rank."""
        idx = np.asarray(indices, dtype=np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"get_subset: indices must be in [0, {self.n})")
        out = np.full((len(idx), self.dim()), -np.inf, dtype=np.float32)
        mine = (idx >= self.offset) & (idx < self.offset + len(self.x))
        out[mine] = self.x[idx[mine] - self.offset]
        out = _all_reduce_np(out, "max")  # one owner per row, -inf elsewhere: exact (keeps -0.0)
        return out

    def search_local(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid of this rank's rows: distances (n_r,) float32, ids (n_r,) int64."""
        return _search(self.x, centroids)

    def perform_search(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        D, I = self.search_local(centroids)
        return _gather_rows(D)[:, None], _gather_rows(I)[:, None]  # (N, 1) each, as faiss.knn

    def assign_to(self, centroids: np.ndarray, weights=None):
        """(I (N,), D (N,), sums (k, d) float32), global: the contract of DatasetAssign."""
        D, I = self.search_local(centroids)
        k = len(centroids)
        if weights is None:
            if self._grid is None:
                self._grid = self._fixed_point_grid(self.x)
            sums = self._exact_sums(self.x, I, k, self._grid)
        else:
            w = np.asarray(weights, dtype=np.float32).ravel()
            if len(w) != self.n:
                raise ValueError(f"weights: need one per row of the dataset ({self.n}), got {len(w)}")
            vals = w[self.offset: self.offset + len(self.x), None] * self.x  # float32, as faiss
            sums = self._exact_sums(vals, I, k, self._fixed_point_grid(vals))
        return _gather_rows(I), _gather_rows(D), sums

    def _fixed_point_grid(self, vals: np.ndarray) -> np.ndarray:
        """Per-dimension power-of-two scales 2**e (d,): N values of magnitude <= the global max
        sum to < 2**62 in int64 after scaling, whatever the order."""
        amax = np.abs(vals).max(axis=0).astype(np.float64) if len(vals) else np.zeros(vals.shape[1])
        amax = _all_reduce_np(amax, "max")  # (d,) global per-dimension max |value|
        if not np.isfinite(amax).all():
            raise ValueError("x_shard: NaN or inf in the data")
        _, ex = np.frexp(amax)  # amax < 2**ex (ex = 0 for an all-zero dimension)
        return np.ldexp(1.0, 62 - self.n.bit_length() - ex)  # (d,) |scaled| < 2**62 / N

    def _exact_sums(self, vals: np.ndarray, assign: np.ndarray, k: int, grid: np.ndarray) -> np.ndarray:
        """sum of ``vals`` rows per cluster over all ranks, (k, d) float32, independent of the
        split into shards and of the summation order: each value is rounded once to the grid
        and summed exactly in int64."""
        acc = np.zeros((k, vals.shape[1]), dtype=np.int64)
        order = np.argsort(assign, kind="stable")
        for b0 in range(0, len(order), self._ROWS_PER_BLOCK):
            rows = order[b0: b0 + self._ROWS_PER_BLOCK]
            ids = assign[rows]  # sorted
            q = np.rint(vals[rows].astype(np.float64) * grid).astype(np.int64)  # (b, d)
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
            acc[ids[starts]] += np.add.reduceat(q, starts, axis=0)
        acc = _all_reduce_np(acc, "sum")
        return (acc.astype(np.float64) / grid).astype(np.float32)


def _search(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """faiss.knn(x, centroids, 1) as (D (n,), I (n,)). faiss computes the distances of fewer
    than ``distance_compute_blas_threshold`` queries by another method (a direct loop instead
    of BLAS, different rounding); padding a small shard to that many rows keeps every row on
    the BLAS path, so a row's distances do not depend on how many rows its rank holds."""
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    n = len(x)
    pad = max(0, int(faiss.cvar.distance_compute_blas_threshold) - n)
    q = np.concatenate([x, np.zeros((pad, x.shape[1]), np.float32)]) if pad else x
    D, I = faiss.knn(q, c, 1)
    return D[:n, 0], I[:n, 0].astype(np.int64)


def kmeans_sharded(x_shard: np.ndarray, k: int, niter: int = 20, seed: int = 0) -> KMeansResult:
    """k-means over the rows of all ranks, each holding its (n_r, d) shard (collective: every
    rank calls it with the same k, niter, seed).

    faiss' Python k-means (``faiss.contrib.clustering.kmeans``, as the C++ one: k distinct
    random rows as initial centroids, ``niter`` Lloyd iterations, empty clusters refilled by
    splitting large ones, no subsampling) on a ``ShardedDatasetAssign``. Returns, on every
    rank: ``centroids`` (k, d) (equal on all ranks), ``assign`` this rank's rows' nearest
    centroid (n_r,), ``objective`` the global sum of squared distances to the final
    centroids, ``iterations`` the global objective per iteration. The result does not depend
    on the number of ranks (module docstring): with W = 1 on the concatenated rows it is the
    same. Works at world size 1 (a plain k-means of ``x_shard``).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k: must be an int >= 1, got {k!r}")
    data = ShardedDatasetAssign(x_shard)
    if k > data.count():
        raise ValueError(f"k: {k} clusters asked for but only {data.count()} points")
    with contextlib.redirect_stdout(io.StringIO()):  # the contrib loop prints "preproc..." always
        centroids, stats = faiss_clustering.kmeans(int(k), data, niter=int(niter), seed=int(seed),
                                                   verbose=False, return_stats=True)
    D, I = data.search_local(centroids)
    objective = float(_gather_rows(D).astype(np.float64).sum())  # same array, same sum, any W
    return KMeansResult(I, np.ascontiguousarray(centroids, dtype=np.float32).copy(), objective,
                        [float(st["obj"]) for st in stats])


def faiss_gpu() -> bool:
    """faiss was built with GPU support (the ``gpu`` install extra) and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0



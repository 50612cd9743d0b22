"""Uniform sampling over clusters (DeepCluster sec. 3.3, "avoiding trivial solutions").

The official ``UnifLabelSampler`` draws ``N // m + 1`` images per non-empty cluster
(with replacement only where the cluster is smaller), shuffles, and truncates to
N, so per-cluster counts differ by a random few. Here the N draws are split so
that every non-empty cluster gets ``N // m`` or ``N // m + 1`` images (the
remainder goes to randomly chosen clusters): the paper's "uniform distribution
over pseudo-labels" exactly, at the same cost.
"""
from __future__ import annotations

import numpy as np


def uniform_cluster_indices(assign: np.ndarray, n: int | None = None, seed: int = 0) -> np.ndarray:
    """An epoch's sample order: ``n`` (default N) indices, equal counts per non-empty cluster.

    assign: (N,) cluster id per sample. Returns (n,) int64 indices into it, shuffled.
    """
    rng = np.random.default_rng(seed)
    assign = np.asarray(assign)
    n = len(assign) if n is None else n
    order = np.argsort(assign, kind="stable")
    ids, starts, sizes = np.unique(assign[order], return_index=True, return_counts=True)
    m = len(ids)
    per = np.full(m, n // m, dtype=np.int64)
    per[rng.choice(m, n % m, replace=False)] += 1
    picks = []
    for start, size, want in zip(starts, sizes, per):
        members = order[start : start + size]
        picks.append(rng.choice(members, want, replace=bool(size < want)))
    out = np.concatenate(picks)
    rng.shuffle(out)
    return out.astype(np.int64)

"""Distributed numerics against one process: the sharded Sinkhorn-Knopp of SeLa
(``sinkhorn_knopp(..., sharded=True)``) and the sharded k-means (``kmeans_sharded``).

The ranks are real torch.distributed processes (gloo, CPU; ``distributed.run_ranks``); the
functions they run are module-level, and each builds its data from a seed (nothing big is
pickled). Row splits are uneven on purpose, and one split leaves a rank with no rows.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distributed import run_ranks
from selfsup.core import dist
from selfsup.cluster.kmeans import ShardedDatasetAssign, kmeans_sharded
from selfsup.cluster.sinkhorn import sinkhorn_knopp

# --------------------------------------------------------------------------------------------- #
# Sinkhorn-Knopp
# --------------------------------------------------------------------------------------------- #
SK_N, SK_K, SK_SEED, SK_LAM = 301, 9, 3, 10.0
# (rows of rank 0, solver keywords): uneven cached float32, uneven streaming float64 with
# chunks that do not divide the shards, and a rank 1 holding no rows at all
SK_CASES = [
    (120, {}),
    (201, {"chunk_size": 37, "dtype": torch.float64}),
    (SK_N, {"chunk_size": 50}),
]


def sk_log_p(n: int = SK_N, k: int = SK_K, seed: int = SK_SEED) -> torch.Tensor:
    """(n, k) log-softmax of Gaussian logits with skewed cluster popularity, so the
    equal-partition constraint has work to do (the raw argmax is unbalanced)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 0.6
    logits += 1.5 * torch.arange(k, dtype=torch.float64) / k
    return torch.log_softmax(logits, dim=1).float()


def _summary(res) -> dict:
    return {f: getattr(res, f) for f in ("labels", "log_q", "log_alpha", "log_beta", "iterations", "converged",
                                         "scaling_change", "marginal_error", "row_error", "column_error",
                                         "kernel_builds")}


def _sk_rank(cases) -> list:
    """On each rank: every case on this rank's rows, then a shard with a NaN on rank 1 only."""
    log_p = sk_log_p()
    out = []
    for split, kw in cases:
        rows = slice(0, split) if dist.rank() == 0 else slice(split, SK_N)
        out.append(_summary(sinkhorn_knopp(log_p[rows], SK_LAM, sharded=True, return_q=True, **kw)))
    bad = log_p[dist.shard(SK_N)].clone()
    if dist.rank() == 1:
        bad[5, 2] = float("nan")
    try:
        sinkhorn_knopp(bad, SK_LAM, sharded=True)
        out.append("no error")
    except ValueError as e:  # must be raised on every rank, not hang the others
        out.append(str(e))
    return out


def test_sharded_sinkhorn_two_ranks_matches_one_process():
    log_p = sk_log_p()
    per_rank = run_ranks(_sk_rank, world=2, args=(SK_CASES,))
    for c, (split, kw) in enumerate(SK_CASES):
        one = sinkhorn_knopp(log_p, SK_LAM, return_q=True, **kw)
        r0, r1 = per_rank[0][c], per_rank[1][c]
        assert one.converged and one.iterations > 20, "the problem should need real iterations"
        assert len(r0["labels"]) == split and len(r1["labels"]) == SK_N - split
        # global scalars: equal on every rank (same stopping iteration), and as one process
        for f in ("iterations", "converged", "scaling_change", "marginal_error", "kernel_builds"):
            assert r0[f] == r1[f], (c, f)
        assert torch.equal(r0["log_beta"], r1["log_beta"]), c
        assert r0["iterations"] == one.iterations and r0["converged"], c
        assert r0["kernel_builds"] == one.kernel_builds, c
        # per-row results, concatenated in rank order, against the whole matrix
        labels = torch.cat([r0["labels"], r1["labels"]])
        assert torch.equal(labels, one.labels), c
        # only the order of the additions in the column sums differs: float64 agrees to
        # ~1e-14; in float32 the stopping statistic (~3e-7 here) carries ~1e-7 of rounding
        # noise and the scalings drift along their gauge (alpha + c, beta - c: same Q) by
        # a few 1e-6, while log Q (gauge-free) agrees to a few float32 ulps
        f64 = kw.get("dtype") == torch.float64
        assert r0["scaling_change"] == pytest.approx(one.scaling_change, rel=1e-6 if f64 else 0,
                                                     abs=0 if f64 else 2e-7), c
        scal_tol, q_tol = (1e-12, 1e-12) if f64 else (1e-4, 5e-5)
        torch.testing.assert_close(r0["log_beta"], one.log_beta, rtol=0, atol=scal_tol)
        torch.testing.assert_close(torch.cat([r0["log_alpha"], r1["log_alpha"]]), one.log_alpha,
                                   rtol=0, atol=scal_tol)
        log_q = torch.cat([r0["log_q"], r1["log_q"]])
        torch.testing.assert_close(log_q, one.log_q, rtol=0, atol=q_tol)
        # marginals: global (rows 1/N over N = 301, columns 1/K), within tolerance
        q = log_q.double().exp()
        assert float(q.sum()) == pytest.approx(1.0, abs=1e-5)
        assert float((q.sum(1) * SK_N - 1).abs().max()) < 1e-4
        assert float((q.sum(0) * SK_K - 1).abs().max()) <= r0["column_error"] + 1e-4
        assert r0["marginal_error"] == pytest.approx(one.marginal_error, abs=1e-12 if f64 else 1e-5), c
        assert r0["marginal_error"] < 1e-5, c
    # a NaN on rank 1 only: both ranks raise (rank 1 with the global sample index)
    assert per_rank[1][-1] == "log_p contains NaN"
    assert "another rank" in per_rank[0][-1]


@pytest.mark.parametrize("kw", [{}, {"chunk_size": 64}, {"dtype": torch.float64, "chunk_size": 1000}])
def test_sharded_sinkhorn_world_one_is_the_unsharded_solve(kw):
    assert dist.world() == 1
    log_p = sk_log_p()
    a = sinkhorn_knopp(log_p, SK_LAM, return_q=True, **kw)
    b = sinkhorn_knopp(log_p, SK_LAM, return_q=True, sharded=True, **kw)
    for f in ("labels", "log_q", "log_alpha", "log_beta"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    for f in ("iterations", "converged", "scaling_change", "marginal_error", "row_error", "column_error",
              "kernel_builds"):
        assert getattr(a, f) == getattr(b, f), f


# --------------------------------------------------------------------------------------------- #
# k-means
# --------------------------------------------------------------------------------------------- #
# (n, d, k, rows of rank 0, niter, seed, duplicated): blobs; and data with only 4 distinct rows
# for k = 7, so clusters go empty and faiss' splitting (random, from the global sizes) runs
KM_CASES = [
    (403, 8, 6, 150, 10, 1, False),
    (203, 5, 7, 140, 6, 2, True),
]


def km_data(n: int, d: int, seed: int, duplicated: bool) -> np.ndarray:
    rs = np.random.RandomState(seed)
    if duplicated:
        return rs.randn(4, d).astype(np.float32)[rs.randint(0, 4, size=n)]
    centres = rs.randn(8, d) * 3
    return (centres[rs.randint(0, 8, size=n)] + rs.randn(n, d)).astype(np.float32)


def _km_rank(cases) -> list:
    out = []
    for n, d, k, split, niter, seed, dup in cases:
        x = km_data(n, d, seed, dup)
        rows = slice(0, split) if dist.rank() == 0 else slice(split, n)
        res = kmeans_sharded(x[rows], k, niter=niter, seed=seed)
        out.append((res.assign, res.centroids, res.objective, res.iterations))
    return out


def test_sharded_kmeans_two_ranks_matches_one_rank():
    per_rank = run_ranks(_km_rank, world=2, args=(KM_CASES,))
    for c, (n, d, k, split, niter, seed, dup) in enumerate(KM_CASES):
        x = km_data(n, d, seed, dup)
        one = kmeans_sharded(x, k, niter=niter, seed=seed)  # world 1, the concatenated rows
        (a0, c0, o0, it0), (a1, c1, o1, it1) = per_rank[0][c], per_rank[1][c]
        assert len(a0) == split and len(a1) == n - split
        assert np.array_equal(c0, c1) and o0 == o1 and it0 == it1, "ranks must agree exactly"
        assert np.array_equal(np.concatenate([a0, a1]), one.assign), c
        np.testing.assert_allclose(c0, one.centroids, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(o0, one.objective, rtol=1e-6)
        np.testing.assert_allclose(it0, one.iterations, rtol=1e-6)
        assert len(it0) == niter
        # a real clustering: the assignment is the nearest centroid, every cluster is used
        # (with duplicated rows only as many as there are distinct rows can be)
        d2 = ((x[:, None, :] - one.centroids[None]) ** 2).sum(-1)
        assert np.array_equal(d2.argmin(1), one.assign)
        assert len(np.unique(one.assign)) == (4 if dup else k)
        # (faiss' |x|^2 + |c|^2 - 2 x.c leaves ~1e-7 |x|^2 of cancellation noise per row)
        np.testing.assert_allclose(one.objective, d2.min(1).sum(), rtol=1e-4, atol=1e-6 * float((x ** 2).sum()))
        # the history decreases (Lloyd) while no cluster is split
        if not dup:
            assert all(b <= a * (1 + 1e-6) for a, b in zip(one.iterations, one.iterations[1:]))


def test_sharded_assign_sums_do_not_depend_on_row_order():
    """The per-centroid sums are exact (fixed point, int64): any order of the rows, hence any
    split into shards, gives the same bits; float32 accumulation would not."""
    rs = np.random.RandomState(0)
    x = (rs.randn(5000, 6) * np.array([1e-3, 1, 1e3, 1, 1, 1e5])).astype(np.float32)
    perm = rs.permutation(len(x))
    cents = x[:9].copy()
    i1, d1, s1 = ShardedDatasetAssign(x).assign_to(cents)
    i2, d2, s2 = ShardedDatasetAssign(x[perm]).assign_to(cents)
    assert np.array_equal(i1[perm], i2) and np.array_equal(d1[perm], d2)
    assert np.array_equal(s1, s2)
    exact = np.zeros((9, 6))
    np.add.at(exact, i1, x.astype(np.float64))
    assert (np.abs(s1 - exact) <= 1e-6 * np.abs(exact) + 1e-6 * np.abs(x).max(0)).all()
    w = rs.rand(len(x)).astype(np.float32)
    _, _, sw = ShardedDatasetAssign(x).assign_to(cents, weights=w)
    _, _, sw2 = ShardedDatasetAssign(x[perm]).assign_to(cents, weights=w[perm])
    assert np.array_equal(sw, sw2)

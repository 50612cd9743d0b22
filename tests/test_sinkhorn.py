"""Tests for selfsup.cluster.sinkhorn (SeLa Sinkhorn-Knopp label assignment). CPU only."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from selfsup.cluster.sinkhorn import (
    CHECK_EVERY,
    SinkhornResult,
    sinkhorn_knopp,
    sinkhorn_reference_numpy,
)


def random_log_p(n: int, k: int, seed: int, scale: float = 1.0, col_bias: float = 0.0,
                 dtype=torch.float64) -> torch.Tensor:
    """(n, k) log-softmax of Gaussian logits; col_bias skews the clusters'
    popularity (cluster j gets + col_bias * j / k) so the raw argmax is unbalanced."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    logits += col_bias * torch.arange(k, dtype=torch.float64) / k
    return torch.log_softmax(logits, dim=1).to(dtype)


def near_one_hot_log_p(n: int, k: int, seed: int) -> torch.Tensor:
    """Nearly one-hot, badly unbalanced P: 70% of samples peak on cluster 0 and
    clusters k-2, k-1 are nobody's argmax. With lam = 100 the non-peak entries
    of P^lam are around exp(-1200): exactly 0 even in float64."""
    g = torch.Generator().manual_seed(seed)
    arg = torch.where(torch.rand(n, generator=g) < 0.7, 0, torch.randint(0, k - 2, (n,), generator=g))
    logits = torch.randn(n, k, generator=g) * 0.5
    logits[torch.arange(n), arg] += 12.0
    return torch.log_softmax(logits, dim=1)


def marginals(res: SinkhornResult):
    """Row and column sums of Q recomputed here from log_q, in float64."""
    q = res.log_q.double().exp()
    return q.sum(dim=1), q.sum(dim=0), q.sum()


def paper_sinkhorn(p: np.ndarray, lam: float, iters: int) -> np.ndarray:
    """Straight from SeLa sec. 3.1: Q = P^lam, then alternately rescale the
    columns to sum to 1/K and the rows to sum to 1/N (columns first, like the
    official code). Written independently of both implementations."""
    n, k = p.shape
    q = p.astype(np.float64) ** lam
    q = q / n  # c0 = 1/N
    for _ in range(iters):
        q = q / q.sum(axis=0, keepdims=True) / k
        q = q / q.sum(axis=1, keepdims=True) / n
    return q


# --------------------------------------------------------------------------- #
# marginals / constraints
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype, tol, bound", [(torch.float64, 1e-10, 1e-7), (torch.float32, 1e-6, 1e-3)])
def test_marginals_match_after_convergence(dtype, tol, bound):
    n, k = 600, 12
    log_p = random_log_p(n, k, seed=1, scale=2.0, col_bias=4.0)
    raw_cols = log_p.exp().sum(0) / n
    assert (raw_cols * k - 1).abs().max() > 0.5  # the raw P is far from an equal partition
    res = sinkhorn_knopp(log_p, lam=10.0, tol=tol, dtype=dtype)
    assert res.converged
    rows, cols, total = marginals(res)
    assert total.item() == pytest.approx(1.0, abs=1e-5)
    row_err = (rows * n - 1).abs().max().item()
    col_err = (cols * k - 1).abs().max().item()
    assert row_err < bound and col_err < bound
    # the reported error is the true one (up to float rounding of exp(log_q))
    assert res.marginal_error == pytest.approx(max(row_err, col_err), rel=0.05, abs=2e-6)
    assert res.marginal_error < bound


def test_marginal_error_reports_an_unconverged_solve():
    log_p = random_log_p(400, 10, seed=2, scale=2.0, col_bias=6.0)
    with pytest.warns(RuntimeWarning, match="max_iters"):
        res = sinkhorn_knopp(log_p, lam=25.0, tol=0.0, max_iters=1, dtype=torch.float64)
    assert not res.converged and res.iterations == 1
    _, cols, _ = marginals(res)
    true_col_err = (cols * 10 - 1).abs().max().item()
    assert true_col_err > 0.05  # one iteration cannot fix this imbalance
    assert res.marginal_error == pytest.approx(true_col_err, rel=1e-6)


# --------------------------------------------------------------------------- #
# equality with dense float64 references
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("lam", [1.0, 5.0, 25.0])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_equals_reference_float64(lam, chunk_size):
    n, k = 300, 15
    log_p = random_log_p(n, k, seed=3, scale=1.5)
    ref = sinkhorn_reference_numpy(log_p.exp().numpy(), lam, tol=1e-9, max_iters=5000)
    res = sinkhorn_knopp(log_p, lam, tol=1e-9, max_iters=5000, dtype=torch.float64, chunk_size=chunk_size)
    assert ref.converged and res.converged
    assert res.iterations == ref.iterations
    np.testing.assert_allclose(res.q.numpy(), ref.q, rtol=1e-9, atol=1e-14)
    np.testing.assert_array_equal(res.labels.numpy(), ref.labels)
    # official r, c are our exp(log_beta), exp(log_alpha) up to a factor traded between them
    d_beta = res.log_beta.numpy() - np.log(ref.r)
    d_alpha = res.log_alpha.numpy() - np.log(ref.c)
    assert np.ptp(d_beta) < 1e-9 and np.ptp(d_alpha) < 1e-9
    # ... and that factor is exactly the reference's normalisation of Q to mass 1
    ref_total = (ref.c[:, None] * log_p.exp().numpy() ** lam * ref.r[None, :]).sum()
    assert d_beta.mean() + d_alpha.mean() == pytest.approx(-math.log(ref_total), abs=1e-9)


@pytest.mark.parametrize("chunk_size", [None, 50])
def test_equals_reference_float32(chunk_size):
    n, k = 500, 20
    log_p = random_log_p(n, k, seed=4, scale=1.5, dtype=torch.float32)
    ref = sinkhorn_reference_numpy(log_p.double().exp().numpy(), 10.0, tol=1e-6)
    res = sinkhorn_knopp(log_p, 10.0, tol=1e-6, chunk_size=chunk_size)
    assert res.iterations == ref.iterations
    assert res.log_q.dtype == torch.float32
    np.testing.assert_allclose(res.q.double().numpy(), ref.q, rtol=2e-4, atol=1e-9)
    np.testing.assert_array_equal(res.labels.numpy(), ref.labels)


def test_every_iterate_equals_paper_update():
    """Iteration by iteration (tol=0, fixed count) against the textbook loop."""
    n, k, lam = 120, 9, 7.0
    log_p = random_log_p(n, k, seed=5, scale=1.0, col_bias=3.0)
    p = log_p.exp().numpy()
    for iters in (1, 2, 13):
        with pytest.warns(RuntimeWarning):
            res = sinkhorn_knopp(log_p, lam, tol=0.0, max_iters=iters, dtype=torch.float64)
        q_paper = paper_sinkhorn(p, lam, iters)
        assert res.iterations == iters
        np.testing.assert_allclose(res.q.numpy(), q_paper / q_paper.sum(), rtol=1e-10, atol=1e-16)
        np.testing.assert_array_equal(res.labels.numpy(), q_paper.argmax(axis=1))


def test_log_q_is_diag_alpha_p_lambda_diag_beta():
    """Eq. 7: Q = diag(a) P^lambda diag(b), with the returned log scalings."""
    log_p = random_log_p(200, 8, seed=6, scale=2.0)
    res = sinkhorn_knopp(log_p, 3.0, tol=1e-8, dtype=torch.float64)
    assert res.converged
    rebuilt = res.log_alpha[:, None] + 3.0 * log_p + res.log_beta[None, :]
    torch.testing.assert_close(res.log_q, rebuilt, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(res.labels.numpy(), rebuilt.argmax(dim=1).numpy())


def official_loop(p: np.ndarray, lam: float):
    """The official cpu_sk loop transcribed literally (K x N layout, r and c
    column vectors, nansum error checked when counter % 10 == 0, stop at
    err <= 0.1). Returns (iterations, labels)."""
    pk = p.T ** lam  # (K, N)
    k, n = pk.shape
    r, c = np.ones((k, 1)) / k, np.ones((n, 1)) / n
    err, counter = 1e6, 0
    while err > 1e-1:
        r = (1.0 / k) / (pk @ c)
        c_new = (1.0 / n) / (r.T @ pk).T
        if counter % 10 == 0:
            err = np.nansum(np.abs(c / c_new - 1))
        c = c_new
        counter += 1
    q = (pk * c.T * r).T  # (N, K)
    return counter, np.nanargmax(q, axis=1)


def test_official_check_cadence():
    """Convergence is only tested when the 0-based counter is a multiple of 10."""
    assert CHECK_EVERY == 10
    log_p = random_log_p(300, 10, seed=7, scale=1.5)
    res = sinkhorn_knopp(log_p, 10.0, tol=1e-7, dtype=torch.float64)
    assert res.converged and res.iterations > 1
    assert (res.iterations - 1) % 10 == 0
    assert res.scaling_change <= 1e-7
    ref = sinkhorn_reference_numpy(log_p.exp().numpy(), 10.0, tol=1e-7)
    assert ref.iterations == res.iterations


@pytest.mark.parametrize("seed, lam", [(8, 25.0), (18, 5.0), (28, 12.0)])
def test_official_tol_scaled_by_n(seed, lam):
    """tol = 0.1 / N reproduces the official nansum(|c/c_new - 1|) <= 0.1 rule."""
    n = 250
    log_p = random_log_p(n, 10, seed=seed, scale=1.5)
    res = sinkhorn_knopp(log_p, lam, tol=0.1 / n, dtype=torch.float64)
    iterations, labels = official_loop(log_p.exp().numpy(), lam)
    assert res.iterations == iterations
    np.testing.assert_array_equal(res.labels.numpy(), labels)


# --------------------------------------------------------------------------- #
# optimality: large lambda -> exact balanced assignment
# --------------------------------------------------------------------------- #
def test_large_lambda_approaches_balanced_assignment_optimum():
    """As lambda grows, Q approaches the optimum of the balanced assignment LP
    (N = m K samples, each cluster exactly m), solved exactly by
    linear_sum_assignment with every column repeated m times."""
    m, k = 6, 8
    n = m * k
    log_p = random_log_p(n, k, seed=9, scale=4.0, col_bias=3.0)
    cost = -log_p.numpy()  # (N, K)
    rows, cols = linear_sum_assignment(np.repeat(cost, m, axis=1))
    opt = cost[rows, cols // m].sum()
    opt_labels = np.empty(n, dtype=np.int64)
    opt_labels[rows] = cols // m

    soft_gaps, hard_gaps = [], []
    for lam in (0.5, 2.0, 10.0, 30.0):
        # Sinkhorn slows down as lambda grows; 3000 iterations leave a small
        # marginal error at lambda >= 10, which enters the bound as slack.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = sinkhorn_knopp(log_p, lam, tol=1e-9, max_iters=3000, dtype=torch.float64)
        assert res.marginal_error < 1e-3
        slack = 2 * n * cost.max() * res.marginal_error + 1e-9
        soft = n * float((res.q.numpy() * cost).sum())  # N * <Q, C>, Q has mass 1
        # entropic gap: 0 <= <Q_lam, C> - <Q*, C> <= log(K) / lam
        assert -slack <= soft - opt <= n * math.log(k) / lam + slack
        soft_gaps.append(soft - opt)
        hard_gaps.append(cost[np.arange(n), res.labels.numpy()].sum() - opt)
    assert all(a > b for a, b in zip(soft_gaps, soft_gaps[1:]))  # monotone in lambda
    assert soft_gaps[0] > 10.0 and soft_gaps[-1] < 0.1
    assert abs(hard_gaps[0]) > 1.0  # small lambda: argmax labels are not the optimum
    assert abs(hard_gaps[-1]) < 1e-9  # large lambda: they are
    np.testing.assert_array_equal(res.labels.numpy(), opt_labels)
    assert (np.bincount(res.labels.numpy(), minlength=k) == m).all()


# --------------------------------------------------------------------------- #
# stability: lambda = 100, near one-hot P
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("chunk_size", [None, 97])
def test_lambda_100_near_one_hot_is_finite_and_balanced(chunk_size):
    n, k = 400, 8
    log_p = near_one_hot_log_p(n, k, seed=10)
    assert float((100.0 * log_p.double()).exp().min()) == 0.0  # P^100 underflows in float64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sinkhorn_reference_numpy(log_p.double().exp().numpy(), 100.0)
    assert not np.isfinite(ref.q).all()  # the unstabilised official update breaks down

    res = sinkhorn_knopp(log_p, 100.0, chunk_size=chunk_size)  # float32
    assert res.converged
    for t in (res.log_q, res.log_alpha, res.log_beta):
        assert torch.isfinite(t).all()
    assert math.isfinite(res.marginal_error) and res.marginal_error < 1e-3
    rows, cols, _ = marginals(res)
    assert (rows * n - 1).abs().max() < 1e-3 and (cols * k - 1).abs().max() < 1e-3
    sizes = res.cluster_sizes()
    assert sizes.min() >= n // k - 2 and sizes.max() <= n // k + 2
    assert res.kernel_builds > 1  # the kernel had to be re-stabilised


# --------------------------------------------------------------------------- #
# balance of the hard labels
# --------------------------------------------------------------------------- #
def test_hard_labels_give_balanced_cluster_sizes():
    n, k = 3000, 30
    log_p = random_log_p(n, k, seed=11, scale=1.0, col_bias=6.0, dtype=torch.float32)
    plain = torch.bincount(log_p.argmax(dim=1), minlength=k)
    assert plain.max() > 3 * n / k and plain.min() < 0.2 * n / k  # raw argmax is very unbalanced
    res = sinkhorn_knopp(log_p, 25.0)
    sizes = res.cluster_sizes()
    assert sizes.sum() == n
    assert (sizes - n / k).abs().max() <= 0.15 * n / k


# --------------------------------------------------------------------------- #
# chunked == unchunked
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_equals_unchunked_float64(chunk_size):
    log_p = random_log_p(131, 11, seed=12, scale=2.0, col_bias=5.0)
    full = sinkhorn_knopp(log_p, 10.0, tol=1e-9, dtype=torch.float64)
    part = sinkhorn_knopp(log_p, 10.0, tol=1e-9, dtype=torch.float64, chunk_size=chunk_size)
    assert part.iterations == full.iterations
    assert part.kernel_builds == full.kernel_builds
    torch.testing.assert_close(part.log_q, full.log_q, rtol=0, atol=1e-11)
    torch.testing.assert_close(part.log_beta, full.log_beta, rtol=0, atol=1e-11)
    assert torch.equal(part.labels, full.labels)
    assert part.marginal_error == pytest.approx(full.marginal_error, rel=1e-3, abs=1e-12)


def test_chunked_equals_unchunked_float32_with_restabilisation():
    log_p = near_one_hot_log_p(300, 6, seed=13)
    # same number of iterations (in float32 at lambda = 100 the stopping
    # statistic sits near its rounding floor, so the stop may differ by a check)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        full = sinkhorn_knopp(log_p, 100.0, tol=0.0, max_iters=600)
        part = sinkhorn_knopp(log_p, 100.0, tol=0.0, max_iters=600, chunk_size=32)
    assert full.kernel_builds > 1  # exercised the re-stabilisation
    assert torch.equal(part.labels, full.labels)
    torch.testing.assert_close(part.log_q, full.log_q, rtol=0, atol=2e-3)
    assert part.marginal_error == pytest.approx(full.marginal_error, rel=0.2, abs=1e-4)
    # and with the default stopping rule both converge to the same labels
    a = sinkhorn_knopp(log_p, 100.0)
    b = sinkhorn_knopp(log_p, 100.0, chunk_size=32)
    assert a.converged and b.converged
    assert abs(a.iterations - b.iterations) <= CHECK_EVERY
    assert torch.equal(a.labels, b.labels)


def test_return_q_false_skips_q_but_keeps_everything_else():
    log_p = random_log_p(200, 10, seed=14, dtype=torch.float32)
    with_q = sinkhorn_knopp(log_p, 10.0, chunk_size=16)
    without = sinkhorn_knopp(log_p, 10.0, chunk_size=16, return_q=False)
    assert without.log_q is None
    with pytest.raises(ValueError, match="return_q"):
        _ = without.q
    assert torch.equal(with_q.labels, without.labels)
    assert with_q.marginal_error == pytest.approx(without.marginal_error)


# --------------------------------------------------------------------------- #
# purity / conventions
# --------------------------------------------------------------------------- #
def test_input_untouched_and_row_shift_invariant():
    log_p = random_log_p(150, 6, seed=15, scale=2.0, dtype=torch.float32)
    log_p.requires_grad_(True)
    before = log_p.detach().clone()
    res = sinkhorn_knopp(log_p, 10.0, device="cpu")
    assert torch.equal(log_p.detach(), before)
    assert res.labels.dtype == torch.int64 and res.labels.shape == (150,)
    assert res.log_q.device.type == "cpu" and not res.log_q.requires_grad
    # unnormalised scores (per-row shifts) give the same Q: shifts go into alpha
    shifted = log_p.detach() + torch.linspace(-30, 30, 150)[:, None]
    res2 = sinkhorn_knopp(shifted, 10.0)
    assert torch.equal(res2.labels, res.labels)
    torch.testing.assert_close(res2.log_q, res.log_q, rtol=0, atol=5e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    log_p = random_log_p(500, 20, seed=16, dtype=torch.float32)
    cpu = sinkhorn_knopp(log_p, 25.0)
    gpu = sinkhorn_knopp(log_p, 25.0, device="cuda")
    assert gpu.labels.device.type == "cuda"
    assert torch.equal(gpu.labels.cpu(), cpu.labels)


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
GOOD = random_log_p(20, 4, seed=17, dtype=torch.float32)


def _with(value, i=3, j=1):
    x = GOOD.clone()
    x[i, j] = value
    return x


def _row_neg_inf():
    x = GOOD.clone()
    x[5, :] = -math.inf
    return x


def _col_neg_inf():
    x = GOOD.clone()
    x[:, 2] = -math.inf
    return x


@pytest.mark.parametrize(
    "log_p, kwargs, match",
    [
        (GOOD[0], {}, "2-D"),
        (GOOD[None], {}, "2-D"),
        (torch.empty(0, 4), {}, "non-empty"),
        (GOOD.numpy(), {}, "torch.Tensor"),
        (torch.zeros(20, 4, dtype=torch.int64), {}, "floating-point"),
        (_with(math.nan), {}, "NaN"),
        (_with(math.inf), {}, r"\+inf"),
        (_row_neg_inf(), {}, "sample 5"),
        (_col_neg_inf(), {}, "cluster 2"),
        (GOOD, {"lam": 0.0}, "lam"),
        (GOOD, {"lam": -1.0}, "lam"),
        (GOOD, {"lam": math.nan}, "lam"),
        (GOOD, {"lam": math.inf}, "lam"),
        (GOOD, {"tol": -1e-3}, "tol"),
        (GOOD, {"max_iters": 0}, "max_iters"),
        (GOOD, {"chunk_size": 0}, "chunk_size"),
        (GOOD, {"dtype": torch.float16}, "dtype"),
    ],
)
def test_bad_input_raises_value_error(log_p, kwargs, match):
    kwargs = dict(kwargs)
    lam = kwargs.pop("lam", 5.0)
    with pytest.raises(ValueError, match=match):
        sinkhorn_knopp(log_p, lam, **kwargs)


def test_good_input_with_some_neg_inf_is_accepted():
    x = _with(-math.inf)  # a single zero probability is fine
    res = sinkhorn_knopp(x, 5.0, dtype=torch.float64)
    assert res.converged and res.marginal_error < 1e-5
    assert res.log_q[3, 1].item() == -math.inf


@pytest.mark.parametrize(
    "p, lam, match",
    [
        (np.ones(5), 1.0, "2-D"),
        (np.full((4, 3), np.nan), 1.0, "NaN"),
        (-np.ones((4, 3)), 1.0, "non-negative"),
        (np.ones((4, 3)), 0.0, "lam"),
    ],
)
def test_reference_bad_input_raises_value_error(p, lam, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn_reference_numpy(p, lam)

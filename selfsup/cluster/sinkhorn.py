"""Sinkhorn-Knopp label assignment for SeLa.

Reference: Y. M. Asano, C. Rupprecht, A. Vedaldi, "Self-labelling via
simultaneous clustering and representation learning", ICLR 2020, sec. 3.1
(Eq. 4-7).

Problem (sec. 3.1): given the network's class posteriors P (N samples x K
clusters), choose a labelling Q in the transportation polytope

    U = { Q >= 0 : Q 1_K = 1/N * 1_N   (every sample has mass 1/N),
                   Q^T 1_N = 1/K * 1_K (equal partition: every cluster gets
                                         mass 1/K) }

that minimises <Q, -log P> - (1/lambda) H(Q)  (Eq. 5-6). The solution has the
form (Eq. 7)

    Q = diag(a) P^lambda diag(b),

and a, b are found by the Sinkhorn-Knopp fixed point: alternately rescale the
columns (clusters) and the rows (samples) so that their sums hit the target
marginals. Hard labels are the per-sample argmax of Q.

Naming. The official code (github.com/yukimasano/self-label,
``sinkhornknopp.py``) stores the matrix transposed (K x N) and calls the
per-cluster scaling ``r`` (length K) and the per-sample scaling ``c`` (length
N). Here the matrix is N x K and the scalings are kept as logarithms:

    log_beta  (K,)  per-cluster scaling, official ``r``  (= b above)
    log_alpha (N,)  per-sample  scaling, official ``c``  (= a above)

    log Q[i, k] = log_alpha[i] + lam * log_p[i, k] + log_beta[k]

Public API
----------
``sinkhorn_knopp``            the solver (torch, CPU or CUDA, float32/float64)
``SinkhornResult``            its result
``sinkhorn_reference_numpy``  slow float64 NumPy *reference* that transcribes
                              the official update literally; used by tests and
                              the benchmark, not meant for production use
``ReferenceResult``           its result

Design choice: stabilised (max-shifted) linear-domain iterations with
log-domain scaling vectors -- not a pure log-sum-exp iteration. On the 2-core
AMD EPYC this was written on, N=50,000, K=3,000 (150M entries; benchmarks/sinkhorn.py
prints the per-solve and per-iteration seconds of this solver and of the reference):

* A pure log-domain iteration (logsumexp over every row and every column)
  needs an ``exp`` per entry per iteration: ~0.12-0.2 s per 150M entries
  here, plus ~6 more elementwise passes. One float32 matrix-vector product
  over the same entries costs ~0.035 s, and one iteration of the float64
  reference (two float64 gemvs) ~0.14 s, so the log-domain solver was ~2x
  slower per iteration than the reference it has to beat (benchmarks/sinkhorn.py).
* So we build the row-max-shifted kernel once,

      G[i, k] = exp(lam * log_p[i, k] + f[k] - m[i]),   m[i] = max_k(...),

  in ``dtype`` (every row has max exactly 1: nothing can overflow and no row
  can vanish), keep the scalings as float64 logs, and run each iteration as
  two matrix-vector products with G (~0.07 s here, vs ~0.14 s for the
  reference; G costs one exp pass, the reference's P**lambda ~3 s: benchmarks/sinkhorn.py). Only
  max-shifted exponentials of the log scalings enter the products. When the
  spread of the column scaling not yet in G exceeds ``tau`` (~20 nats in
  float32) it is absorbed into the kernel (f <- log_beta) and G is rebuilt
  from log_p (the "absorption" of stabilised scaling algorithms; Schmitzer,
  "Stabilized sparse scaling algorithms for entropy regularized transport
  problems", 2019). This is what keeps lambda = 100 on nearly one-hot P
  finite, where P^lambda underflows to exact zeros even in float64 and the
  official code produces inf/NaN. ``_numerics`` derives tau and the exp
  clamp floor so that clamping never costs more than eps/8 in any row or
  column sum and no denormal is ever produced.
* ``chunk_size`` selects streaming mode: G is never stored; every iteration
  recomputes it block by block (bit-identical blocks, thanks to the stored
  row shifts m) and uses each block for both products while it is in cache.
  Extra memory is O(N + K) + chunk_size * K, for one exp per entry per
  iteration. Both modes run the same iteration, so results agree to
  rounding.
* With log_p in float32, lam * log_p is only known to ~lam * |log_p| * 6e-8
  (~1e-5 at lam = 25), which bounds how small the marginal error can get in
  float32 (~1e-5 - 1e-4). Use dtype=torch.float64 for tighter marginals.

Differences from the official code (all deliberate):

* stopping: mean instead of sum of |c/c_new - 1| (see DEFAULT_TOL), plus a
  max_iters cap; we also report the true marginal error, which the official
  code never computes;
* numerics: stabilised kernel + log scalings instead of P**lambda in the
  linear domain (which breaks down for large lambda / peaked P); default
  float32 instead of float64 (pass dtype=torch.float64 to match);
* layout: N x K instead of K x N; the input is log P, not P.
The update order (r from c, then c from r, starting from c = 1/N), the check
every 10 iterations and the argmax labels are the same, and with float64 the
iterates match the official ones to ~1e-14 (see tests).

Distributed solve (``sharded=True``)
------------------------------------
For an N x K problem too big for one device, each of W ranks of a
torch.distributed group holds a contiguous shard of the rows (samples) of
log P and calls ``sinkhorn_knopp(log_p_shard, ..., sharded=True)``; ranks are
taken in rank order (rank r's rows come after rank r-1's). The idea is SwAV's
``distributed_sinkhorn`` (Caron et al., NeurIPS 2020, github.com/facebookresearch/swav):
the per-sample (row) scaling of a row needs only that row, so it is local; the
per-cluster (column) scaling needs sums over all N rows, so the K column sums
are all-reduced once per iteration. What is communicated, per iteration: one
all-reduce of K float64 (the column sums) plus, at every stopping check, one
scalar; the N x K data never moves. Everything else is replicated: log_beta,
the absorbed column scaling f and the decision to rebuild the kernel are
computed from all-reduced quantities, so they are bitwise equal on every rank.

Stability of the column reduction. Each rank's partial column sum
G_r^T w_r is already in the solver's common linear scale (Q = exp(a_shift) *
w[i] * G[i, k] * exp(d[k]) with a_shift, d, f replicated and the per-row
shift m[i] folded into w): every term is a product of a kernel entry in
[e^floor, 1] and a row weight in [1/K, e^tau], so partial sums are >= 0, no
larger than n_r e^tau and need no shift before they are added (the
all-reduced sum is >= 1/K, see ``_numerics``). The two exact log-domain
passes are reduced by max-then-shifted-sum: iteration 0's column
log-sum-exp (all-reduce the per-column max, rescale each rank's shifted
partial sums to it, all-reduce the sums) and the final total mass.
``_numerics`` (tau, clamp floor) and the row marginal 1/N use the global N, so
every rank runs the same numerics as one process would.

Stopping: the statistic mean_i |c_old/c_new - 1| is a global mean (local sums
all-reduced, divided by the global N), so every rank sees the same value and
stops at the same iteration. Data-dependent input errors (a row without a
finite entry, NaN) are detected collectively and raised on every rank;
argument errors (lam, dtype, shapes) are raised before any communication, and
ranks that disagree on K, lam, tol, max_iters or dtype all raise.

Against one process on the concatenated rows the only difference is the
order of floating-point additions in the column sums (per-rank partial sums,
then the all-reduce), i.e. rounding: the iterates agree to ~eps, so labels and
the iteration count are the same except for exact near-ties (a label whose
top two Q entries differ by a rounding error, or a stopping statistic that is
within rounding of ``tol`` at a check). With world size 1 (or sharded=False)
the solver is the single-process one, bit for bit.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch

from selfsup.core import dist as _dist

__all__ = [
    "DEFAULT_MAX_ITERS",
    "DEFAULT_TOL",
    "CHECK_EVERY",
    "ReferenceResult",
    "SinkhornResult",
    "sinkhorn_knopp",
    "sinkhorn_reference_numpy",
]

# Stopping statistic (both solvers): mean over samples of |c_old / c_new - 1|
# where c is the per-sample scaling, evaluated every CHECK_EVERY iterations.
#
# Difference from the official code: it uses the *sum* over samples,
# err = nansum(|c / c_new - 1|), against a hard-coded 0.1. A sum grows with
# N, so the same 0.1 means a mean relative change of 2e-6 at N=50k but 8e-8 at
# N=1.28M -- below float32 resolution, so a float32 solver could fail to
# stop at all. We divide by N so that one tol means the same at every N. To
# reproduce the official rule exactly, pass tol = 0.1 / N.
# DEFAULT_TOL = 1e-6 is the official rule at N = 100k, and ~10x above the
# level where float32 rounding makes the statistic jitter (~1e-7).
DEFAULT_TOL = 1e-6
DEFAULT_MAX_ITERS = 10_000
# Official cadence: err is evaluated when the 0-based counter is a multiple of
# 10, so a converged run has done 1, 11, 21, ... iterations.
CHECK_EVERY = 10

# Rows per block for passes over log_p when the caller gives no chunk_size.
# CPU: 16 MiB of float32 (fits L3 here). At K=3000, blocks of 1-16 MiB ran
# equally fast on an idle machine, but every torch op on a block is an OpenMP
# parallel region, and when other processes compete for the cores each region
# can stall for a scheduler slice (a kernel build with 1 MiB blocks became
# many times slower); fewer, larger blocks bound that damage. GPUs:
# much larger, as launch overhead dominates there.
_CPU_BLOCK_ELEMS = 1 << 22
_GPU_BLOCK_ELEMS = 1 << 26
# Auto return_q threshold (entries of Q) when return_q=None.
_AUTO_RETURN_Q_MAX_ELEMS = 1 << 25

# Exponentials of N x K blocks are taken in base 2: exp(x) = exp2(x * log2 e),
# with log2 e folded into lam and the shifts, so it costs nothing. exp2 ran
# faster than exp here (one thread) and, unlike
# exp/log, does not use torch's small-grain VML path (see _SERIAL_SLICE).
_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)

# O(N) and O(K) vector work is negligible next to the N x K products, but on
# CPU every torch op above a size threshold (2048 elements for exp/log-like
# ops, 32768 for others) becomes an OpenMP parallel region, and when other
# processes share the cores each region can stall for a scheduler slice
# (milliseconds for microseconds of work; whole solves got several times slower). So
# per-iteration vector ops run single-threaded, in slices below the threshold.
_SERIAL_SLICE = 2048


def _sliced(fn, *xs: torch.Tensor) -> torch.Tensor:
    """fn(*xs) for equal-length 1-D tensors, evaluated slice by slice on CPU."""
    n = xs[0].shape[0]
    if xs[0].device.type != "cpu" or n <= _SERIAL_SLICE:
        return fn(*xs)
    return torch.cat([fn(*(x[i : i + _SERIAL_SLICE] for x in xs)) for i in range(0, n, _SERIAL_SLICE)])


# --------------------------------------------------------------------------- #
# Results
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class SinkhornResult:
    """Result of :func:`sinkhorn_knopp`.

    ``log_q[i, k] == log_alpha[i] + lam * log_p[i, k] + log_beta[k]`` up to
    rounding of ``dtype``, and ``exp(log_q)`` sums to 1 (rows to 1/N, columns
    to 1/K within ``marginal_error``).

    From a sharded solve (``sharded=True``, world size > 1): ``labels``,
    ``log_q`` and ``log_alpha`` are this rank's rows (exp(log_q) sums to this
    rank's share of the total mass 1), ``log_beta`` and every scalar
    (iterations, converged, scaling_change, the marginal errors,
    kernel_builds) are global and equal on every rank; ``cluster_sizes()``
    counts this rank's rows (all-reduce it for the global sizes).
    """

    labels: torch.Tensor  # (N,) int64, argmax_k Q[i, k] (sharded: this rank's rows)
    log_q: Optional[torch.Tensor]  # (N, K) log Q (total mass 1) or None
    log_alpha: torch.Tensor  # (N,) float64 per-sample log scaling (official c)
    log_beta: torch.Tensor  # (K,) float64 per-cluster log scaling (official r)
    iterations: int  # Sinkhorn iterations run (one column + one row update each)
    converged: bool  # stopping rule met before max_iters
    scaling_change: float  # last stopping statistic, mean |c_old/c_new - 1|
    marginal_error: float  # max(row_error, column_error), see below
    row_error: float  # max_i |N * sum_k Q[i, k] - 1|
    column_error: float  # max_k |K * sum_i Q[i, k] - 1|
    kernel_builds: int  # times the kernel was (re)built from log_p (diagnostic)
    seconds: float  # wall time of the whole call

    @property
    def q(self) -> torch.Tensor:
        """Q itself (N, K); raises if the solve was run with return_q=False."""
        if self.log_q is None:
            raise ValueError("Q was not materialised; call with return_q=True")
        return self.log_q.exp()

    def cluster_sizes(self, k: Optional[int] = None) -> torch.Tensor:
        """Number of samples per cluster under the hard labels, shape (K,)."""
        k = self.log_beta.numel() if k is None else k
        return torch.bincount(self.labels, minlength=k)


@dataclass(frozen=True)
class ReferenceResult:
    """Result of :func:`sinkhorn_reference_numpy` (all NumPy, float64)."""

    labels: np.ndarray  # (N,) int64
    q: np.ndarray  # (N, K) Q normalised to total mass 1
    r: np.ndarray  # (K,) per-cluster scaling (official r)
    c: np.ndarray  # (N,) per-sample scaling (official c)
    iterations: int
    converged: bool
    scaling_change: float  # official err / N, see DEFAULT_TOL
    marginal_error: float
    seconds: float


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #
def _check_scalars(lam: float, tol: float, max_iters: int) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float, np.integer, np.floating)):
        raise ValueError(f"lam must be a real number, got {type(lam).__name__}")
    lam = float(lam)
    if not math.isfinite(lam) or lam <= 0.0:
        raise ValueError(f"lam must be finite and > 0, got {lam}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.integer, np.floating)):
        raise ValueError(f"tol must be a real number, got {type(tol).__name__}")
    if not math.isfinite(float(tol)) or tol < 0.0:
        raise ValueError(f"tol must be finite and >= 0, got {tol}")
    if isinstance(max_iters, bool) or not isinstance(max_iters, (int, np.integer)):
        raise ValueError(f"max_iters must be an int, got {type(max_iters).__name__}")
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    return lam


def _check_shape(shape: Tuple[int, ...], what: str) -> Tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(
            f"{what} must be 2-D (N samples x K clusters), got shape {tuple(shape)}"
        )
    n, k = int(shape[0]), int(shape[1])
    if n < 1 or k < 1:
        raise ValueError(f"{what} must be non-empty, got shape {tuple(shape)}")
    return n, k


# --------------------------------------------------------------------------- #
# Numerics
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class _Numerics:
    eps: float  # unit roundoff of the compute dtype
    tau: float  # max spread (nats) of the unabsorbed column scaling
    floor: float  # exponents (relative to a max of 0) are clamped to >= floor


def _numerics(dtype: torch.dtype, n: int, k: int) -> _Numerics:
    """Choose the absorption threshold tau and the exp() clamp floor.

    Constraints (log scale):
      (a) no denormals: kernel entries (>= e^floor) times a column factor
          (>= e^-tau) or a row weight (>= 1/K) stay >= e^8 * tiny, i.e.
          floor >= log(tiny) + 8 + max(tau, log K). Denormal exps were
          much slower on this CPU, and they carry no precision.
      (b) clamping is invisible: after a row update a column has mass
          >= 1/(N K) (it had 1/K, and no row is scaled by less than 1/N),
          while clamped entries add at most e^(floor + tau) * N to the
          column sums G^T w, whose true value is >= 1/K. Requiring
          e^(floor + tau) * N * K <= eps / 8 makes the clamp error a fraction
          of a rounding error in every column sum (and in every row sum).
    Both hold with the largest tau <= tau_max that fits; for float32,
    N = 1.28M and K = 3000 this gives tau ~ 19.5.
    """
    fi = torch.finfo(dtype)
    lo = math.log(fi.tiny) + 8.0  # floor - max(tau, log K) >= lo
    hi = math.log(fi.eps / 8.0) - math.log(n) - math.log(k)  # floor + tau <= hi
    log_k = math.log(k)
    tau_max = 20.0 if dtype == torch.float32 else 200.0
    tau = min(tau_max, (hi - lo) / 2.0, hi - lo - log_k)
    if tau < 2.0:
        raise ValueError(
            f"problem too large for {dtype}: N*K = {n * k:.3g} leaves no exponent range; use float64"
        )
    floor = lo + max(tau, log_k)
    return _Numerics(eps=fi.eps, tau=tau, floor=floor)


def _block_rows(n: int, k: int, device: torch.device, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return max(1, min(n, chunk_size))
    target = _GPU_BLOCK_ELEMS if device.type == "cuda" else _CPU_BLOCK_ELEMS
    return max(1, min(n, target // k))


def _blocks(n: int, rows: int) -> Iterator[Tuple[int, int]]:
    for i0 in range(0, n, rows):
        yield i0, min(n, i0 + rows)


def _scaled_logp(out: torch.Tensor, lp: torch.Tensor, lam: float, vec: Optional[torch.Tensor]) -> None:
    """out = lam * lp + vec[None, :] in out's dtype.   out, lp: (c, K); vec: (K,)"""
    if lp.dtype == out.dtype:
        if vec is None:
            torch.mul(lp, lam, out=out)
        else:
            torch.add(vec, lp, alpha=lam, out=out)  # vec + lam * lp, one pass
    else:  # cast block by block; never a full-size converted copy of log_p
        out.copy_(lp)
        out.mul_(lam)
        if vec is not None:
            out.add_(vec)


class _ColumnLogSumExp:
    """Online per-column log-sum-exp over row blocks (like a streaming softmax).

    Takes base-2 log values (x2 = x * log2 e) and keeps a running column max
    ``m2`` (K,) and ``acc`` (K,) = sum 2^(x2 - m2) in float64, so memory is
    O(K) however many rows are streamed. ``result`` is in natural log.
    """

    def __init__(self, k: int, device: torch.device, floor2: float):
        self.m2 = torch.full((k,), -math.inf, dtype=torch.float64, device=device)  # (K,)
        self.acc = torch.zeros(k, dtype=torch.float64, device=device)  # (K,)
        self.floor2 = floor2

    def add(self, x2: torch.Tensor) -> None:
        """x2: (c, K) base-2 log values; overwritten."""
        # new max; m2 only ever holds values of x2's dtype, so the shift is exact
        new_m2 = torch.maximum(self.m2, x2.amax(dim=0).double())  # (K,)
        shift = torch.where(torch.isfinite(new_m2), new_m2, torch.zeros_like(new_m2))  # (K,)
        self.acc.mul_(torch.exp2(self.m2 - shift))  # rescale the old partial sums
        x2.sub_(shift.to(x2.dtype))  # (c, K) <= 0
        x2.clamp_min_(self.floor2).exp2_()  # terms below 2^floor2 of the max don't matter
        self.acc.add_(x2.sum(dim=0))  # (K,)
        # ... but a column that is -inf throughout must stay exactly empty
        self.acc.masked_fill_(new_m2 == -math.inf, 0.0)
        self.m2 = new_m2

    def all_reduce(self) -> None:
        """Combine the partial sums of all ranks (rows sharded): all-reduce the column
        max first, rescale this rank's shifted sums to it, then all-reduce the sums.
        Every term is <= 1 after the rescale, so nothing can overflow, and a rank's
        small share underflows only where it is negligible next to the max."""
        m2 = _dist.all_reduce(self.m2.clone(), "max")  # (K,) global column max
        shift = torch.where(torch.isfinite(m2), m2, torch.zeros_like(m2))  # (K,)
        self.acc.mul_(torch.exp2(self.m2 - shift))  # (K,) local -inf -> factor 0
        _dist.all_reduce(self.acc, "sum")
        self.m2 = m2

    def result(self) -> torch.Tensor:
        """(K,) float64 natural log-sum-exp over all rows added (-inf if empty)."""
        m2 = torch.where(torch.isfinite(self.m2), self.m2, torch.zeros_like(self.m2))
        return _sliced(torch.log, self.acc) + m2 * _LN2


# --------------------------------------------------------------------------- #
# The solver
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class _Shards:
    """Rows of log_p split over the ranks of a process group (world size > 1)."""

    n_global: int  # N: rows over all ranks
    offset: int  # global index of this rank's first row


class _Solver:
    """State of one solve. Scalings are float64 logs; N x K work in ``dtype``.

    The kernel is G[i, k] = exp(max(lam * log_p[i, k] + f[k] - m[i], floor)):
    f (K,) is the column scaling absorbed at the last (re)build and m (N,) the
    row max at that time, so every row of G has max exactly 1. (G is computed
    in base 2, see _LOG2E: m2 = m * log2 e is what is stored.) After a row
    update the state is

        log_beta[k]  = f[k] + d[k]                  (d: unabsorbed, spread <= tau)
        log_alpha[i] = log w[i] - m[i] + a_shift    (w (N,) in [1/K, e^tau])

    i.e. Q[i, k] = exp(a_shift) * w[i] * G[i, k] * exp(d[k]). Only w and m2
    are stored per sample; log_alpha is formed on demand (at the stopping
    checks and at the end), keeping per-iteration O(N) work to one op.

    With ``shards`` (sharded solve, world size > 1), ``log_p`` and every (N,)
    vector hold this rank's rows only (``self.n`` of them); N in the numerics
    and the marginals is the global ``n_global``, and the column sums, the
    stopping statistic and the final totals are all-reduced (module docstring).
    """

    def __init__(self, log_p, lam, dtype, device, rows, streaming, shards: Optional[_Shards] = None):
        self.log_p = log_p  # (N, K) on device, any float dtype
        self.lam2 = lam * _LOG2E  # lambda in base-2 units
        self.dtype = dtype
        self.device = device
        self.n, self.k = log_p.shape
        self.shards = shards
        self.n_global = self.n if shards is None else shards.n_global
        self.rows = rows
        self.streaming = streaming
        self.num = _numerics(dtype, self.n_global, self.k)
        self.floor2 = self.num.floor * _LOG2E
        self.log_n = math.log(self.n_global)
        self.log_k = math.log(self.k)
        self.log_beta = torch.zeros(self.k, dtype=torch.float64, device=device)  # (K,)
        self.f: Optional[torch.Tensor] = None  # (K,) float64, absorbed into G
        self.m2 = torch.zeros(self.n, dtype=dtype, device=device)  # (N,) base-2 row shifts of G
        self.w: Optional[torch.Tensor] = None  # (N,) row weights; None = official c0 = 1/N
        self.a_shift = 0.0
        self.colsum: Optional[torch.Tensor] = None  # (K,) G^T w when already computed
        self.kernel_builds = 0
        if streaming:
            self.G = None
            self.buf = torch.empty(rows, self.k, dtype=dtype, device=device)  # (rows, K)
        else:
            self.G = torch.empty(self.n, self.k, dtype=dtype, device=device)  # (N, K)
            self.buf = None

    def log_alpha(self) -> torch.Tensor:
        """(N,) float64 per-sample log scaling (official log c)."""
        if self.w is None:
            return torch.full((self.n,), -self.log_n, dtype=torch.float64, device=self.device)
        a_shift = self.a_shift
        return _sliced(lambda w, m2: torch.log(w.double()) - m2.double() * _LN2 + a_shift, self.w, self.m2)

    # -- exact log-domain passes ------------------------------------------- #
    def first_column_update(self) -> None:
        """Iteration 0's column update from c0 = 1/N, exactly in the log domain.

        log_beta[k] = -log K - logsumexp_i(lam * log_p[i, k] - log N)
        (official: r = inv_K / (P^lam @ c) with c = 1/N). This pass also
        validates the input at no extra cost.
        """
        lse = _ColumnLogSumExp(self.k, self.device, self.floor2)
        bad_rows = torch.zeros((), dtype=torch.int64, device=self.device)
        buf = self.buf if self.buf is not None else self.G[: self.rows]  # G is not built yet
        for i0, i1 in _blocks(self.n, self.rows):
            x2 = buf[: i1 - i0]  # (c, K)
            _scaled_logp(x2, self.log_p[i0:i1], self.lam2, None)  # lam * log_p * log2 e
            # NaN and +inf propagate through amax; a row of -inf gives -inf.
            bad_rows += (~torch.isfinite(x2.amax(dim=1))).sum()
            lse.add(x2)
        local_bad = int(bad_rows)
        if self.shards is not None:  # every rank raises, or none does
            if int(_dist.all_reduce(bad_rows.reshape(1), "sum")) > 0:
                if local_bad == 0:
                    raise ValueError("log_p (sharded) has a row without a finite entry, or NaN / +inf, "
                                     "on another rank")
                self._raise_bad_rows()
            lse.all_reduce()
        elif local_bad > 0:
            self._raise_bad_rows()
        col = lse.result()  # (K,)
        if not bool(torch.isfinite(col).all()):
            k_bad = int(torch.nonzero(~torch.isfinite(col))[0])
            raise ValueError(
                f"cluster {k_bad} has no finite log-probability (all -inf, or lam * log_p "
                "underflowed): it can never receive its 1/K share of the mass"
            )
        self.log_beta = -self.log_k + self.log_n - col

    def _raise_bad_rows(self) -> None:
        for i0, i1 in _blocks(self.n, self.rows):
            blk = self.log_p[i0:i1]
            if bool(torch.isnan(blk).any()):
                raise ValueError("log_p contains NaN")
            if bool(torch.isposinf(blk).any()):
                raise ValueError("log_p contains +inf (log-probabilities must be < +inf)")
        for i0, i1 in _blocks(self.n, self.rows):
            rm = (self.log_p[i0:i1].to(self.dtype) * self.lam2).amax(dim=1)  # (c,)
            if not bool(torch.isfinite(rm).all()):
                i_bad = i0 + int(torch.nonzero(~torch.isfinite(rm))[0])
                if self.shards is not None:
                    i_bad += self.shards.offset  # the global sample index
                raise ValueError(
                    f"sample {i_bad} has no finite log-probability (all -inf, or lam * log_p "
                    "overflowed): its 1/N mass cannot be placed"
                )
        raise ValueError("log_p has a row without a finite entry")  # not reached

    # -- kernel ------------------------------------------------------------ #
    def _kernel_block(self, out: torch.Tensor, i0: int, i1: int, f2_c: torch.Tensor, rebuild: bool) -> None:
        """out (c, K) <- G[i0:i1]. On a rebuild m2[i0:i1] is set to the row max;
        otherwise the stored m2 is reused, so the block is bit-identical to the
        one built at the last absorption."""
        _scaled_logp(out, self.log_p[i0:i1], self.lam2, f2_c)  # (lam*log_p + f) * log2 e
        if rebuild:
            self.m2[i0:i1] = out.amax(dim=1)  # (c,) finite: every row has a finite entry
        out.sub_(self.m2[i0:i1, None]).clamp_min_(self.floor2).exp2_()  # in [e^floor, 1]

    # -- updates ------------------------------------------------------------ #
    def row_update(self) -> None:
        """log_alpha = -log N - logsumexp_k(lam * log_p + log_beta)   (official c)."""
        rebuild = self.f is None
        if not rebuild:
            d = self.log_beta - self.f  # (K,) unabsorbed column scaling
            rebuild = float(d.max()) - float(d.min()) > self.num.tau
        if rebuild:  # absorb: the kernel now carries log_beta, d = 0
            self.f = self.log_beta.clone()
            d = torch.zeros_like(self.f)
            self.kernel_builds += 1
        d_max = float(d.max())
        v = torch.exp2((d - d_max) * _LOG2E).to(self.dtype)  # (K,) in [e^-tau, 1]
        f2_c = (self.f * _LOG2E).to(self.dtype)  # (K,)
        # sum_k exp(lam*log_p[i,k] + log_beta[k]) = exp(m[i] + d_max) * (G v)[i], and
        # (G v)[i] >= e^-tau because G's row max is 1 and v >= e^-tau: no underflow.
        if self.streaming:
            # Recompute G block by block; while a block is in cache, use it for
            # this row update and for its share of the next column update.
            if self.w is None:
                self.w = torch.empty(self.n, dtype=self.dtype, device=self.device)  # (N,)
            colsum = torch.zeros(self.k, dtype=torch.float64, device=self.device)  # (K,)
            for i0, i1 in _blocks(self.n, self.rows):
                g = self.buf[: i1 - i0]  # (c, K)
                self._kernel_block(g, i0, i1, f2_c, rebuild)
                w = _sliced(torch.reciprocal, torch.mv(g, v))  # (c,) 1 / (G v)
                self.w[i0:i1] = w
                colsum += torch.mv(g.t(), w).double()  # (K,) G^T w
            self.colsum = colsum
        else:
            if rebuild:
                for i0, i1 in _blocks(self.n, self.rows):
                    self._kernel_block(self.G[i0:i1], i0, i1, f2_c, True)
            self.w = _sliced(torch.reciprocal, torch.mv(self.G, v))  # (N,) 1 / (G v)
            self.colsum = None  # the next column update computes G^T w
        self.a_shift = -self.log_n - d_max

    def column_update(self) -> None:
        """log_beta = -log K - logsumexp_i(lam * log_p + log_alpha)   (official r)."""
        colsum = self.colsum
        if colsum is None:
            colsum = torch.mv(self.G.t(), self.w).double()  # (K,)
        self.colsum = None
        if self.shards is not None:
            # partial sums of every rank are in the same scale (a_shift, f, d are
            # replicated; row shifts live in w): a plain sum is stable, see module doc
            _dist.all_reduce(colsum, "sum")
        # sum_i exp(lam*log_p[i,k] + log_alpha[i]) = exp(a_shift - f[k]) * colsum[k],
        # colsum[k] >= 1/K (see _numerics), so the log is safe and accurate.
        self.log_beta = self.f - self.log_k - self.a_shift - _sliced(torch.log, colsum)  # (K,)

    # -- final exact pass ----------------------------------------------------- #
    def finish(self, return_q: bool):
        """Labels, optional log Q and the true marginals, recomputed from log_p.

        Q = diag(alpha) P^lam diag(beta) with the scalings of the last
        iteration (as the official code: c from the last row update and the r
        it was computed from), so rows are exact and columns carry the
        remaining error.
        """
        n, k, dt = self.n, self.k, self.dtype
        log_alpha = self.log_alpha()  # (N,)
        labels = torch.empty(n, dtype=torch.int64, device=self.device)  # (N,)
        log_rowmass = torch.empty(n, dtype=torch.float64, device=self.device)  # (N,)
        colmass = torch.zeros(k, dtype=torch.float64, device=self.device)  # (K,) N * column mass
        log_q = None
        if return_q:  # reuse the kernel's storage for log Q when there is one
            log_q = self.G if self.G is not None else torch.empty(n, k, dtype=dt, device=self.device)
        self.G = None  # kernel no longer needed: free it before allocating scratch
        work = self.buf if self.buf is not None else torch.empty(self.rows, k, dtype=dt, device=self.device)
        scratch = torch.empty(self.rows, k, dtype=dt, device=self.device)
        beta2_c = (self.log_beta * _LOG2E).to(dt)  # (K,)
        for i0, i1 in _blocks(n, self.rows):
            x2 = log_q[i0:i1] if log_q is not None else work[: i1 - i0]  # (c, K)
            e = scratch[: i1 - i0]  # (c, K)
            _scaled_logp(x2, self.log_p[i0:i1], self.lam2, beta2_c)  # (lam*log_p + log_beta) * log2 e
            mx2, idx = x2.max(dim=1)  # (c,), (c,): argmax_k Q[i, k]
            labels[i0:i1] = idx
            x2.sub_(mx2[:, None])  # (c, K) <= 0
            off = log_alpha[i0:i1] + mx2.double() * _LN2  # (c,) log of the row's scale, ~ -log N - log s
            torch.clamp(x2, min=self.floor2, out=e).exp2_()  # (c, K) row max 1
            log_rowmass[i0:i1] = off + _sliced(torch.log, e.sum(dim=1).double())
            # column masses in the linear domain, with bounded row weights
            # u = N * exp(off) ~ 1 / row sum in [~1/K, 1]; the clamp costs
            # <= eps/8 per column here too (see _numerics)
            u = torch.exp2((off + self.log_n) * _LOG2E).to(dt)  # (c,)
            colmass += torch.mv(e.t(), u).double()  # (K,)
            if log_q is not None:
                torch.add(off.to(dt)[:, None], x2, alpha=_LN2, out=x2)  # (c, K) natural log Q
        if self.shards is None:
            log_total = torch.logsumexp(log_rowmass, dim=0)  # ~0: rows were just normalised
        else:
            log_total = self._global_logsumexp(log_rowmass)
            _dist.all_reduce(colmass, "sum")  # (K,) same scale on every rank (u in ~[1/K, 1])
        log_rowmass -= log_total
        log_colmass = _sliced(torch.log, colmass) - self.log_n - log_total  # (K,)
        if log_q is not None:
            log_q.sub_(log_total.to(dt))
        self.final_log_alpha = log_alpha - log_total
        if self.shards is None:
            row_err = float((torch.exp(log_rowmass + self.log_n) - 1.0).abs().max())
        else:
            row_dev = (torch.exp(log_rowmass + self.log_n) - 1.0).abs()  # (n,) this rank's rows
            row_max = row_dev.max().reshape(1) if self.n > 0 else torch.zeros(1, dtype=torch.float64,
                                                                              device=self.device)
            row_err = float(_dist.all_reduce(row_max, "max"))
        col_err = float((torch.exp(log_colmass + self.log_k) - 1.0).abs().max())
        return labels, log_q, row_err, col_err

    def _global_logsumexp(self, x: torch.Tensor) -> torch.Tensor:
        """log sum_i exp(x[i]) over the rows of all ranks (x: (n,) float64 local), as a 0-d
        tensor: all-reduce the max, then the sums of exp(x - max) (each term <= 1)."""
        mx = x.max().reshape(1) if x.numel() else torch.full((1,), -math.inf, dtype=x.dtype, device=x.device)
        _dist.all_reduce(mx, "max")  # finite: the global N >= 1 rows all have finite mass
        s = torch.exp(x - mx).sum().reshape(1)
        _dist.all_reduce(s, "sum")
        return (mx + torch.log(s))[0]

    def mean_over_rows(self, v: torch.Tensor) -> float:
        """mean of a per-row quantity over all N rows (all ranks)."""
        if self.shards is None:
            return float(v.mean())
        s = v.sum().reshape(1)
        return float(_dist.all_reduce(s, "sum")) / self.n_global


def sinkhorn_knopp(
    log_p: torch.Tensor,
    lam: float,
    tol: float = DEFAULT_TOL,
    max_iters: int = DEFAULT_MAX_ITERS,
    *,
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.float32,
    chunk_size: Optional[int] = None,
    return_q: Optional[bool] = None,
    sharded: bool = False,
) -> SinkhornResult:
    """Solve SeLa's label assignment (sec. 3.1, Eq. 4-7) by Sinkhorn-Knopp.

    Args:
        log_p: (N, K) log class posteriors, e.g. ``log_softmax(logits, 1)``.
            Rows may be unnormalised (any per-row shift is absorbed into the
            row scaling); entries may be -inf (probability 0) as long as every
            row and every column has a finite entry. NaN / +inf are rejected.
        lam: lambda > 0 of Eq. 6 (official default 25); P is raised to it.
        tol: stop when, at a check (every ``CHECK_EVERY`` = 10 iterations, as
            the official code), the mean over samples of |c_old/c_new - 1|
            is <= tol. The official rule is sum <= 0.1, i.e. tol = 0.1 / N.
        max_iters: hard cap (the official loop has none); a RuntimeWarning
            is issued and ``converged`` is False when it is hit.
        device: where to compute; default ``log_p.device``. If it differs,
            log_p is copied there once.
        dtype: compute dtype for N x K work (float32 or float64). Scalings
            are always float64 (they are only O(N + K)).
        chunk_size: None -> cache the kernel G (one extra N x K array in
            ``dtype``; each iteration is two matrix-vector products).
            An int -> streaming mode: rows are processed chunk_size at a time
            and nothing N x K is allocated beyond ``log_p`` (and log Q if
            requested); slower, one exp per entry per iteration.
        return_q: materialise log Q (N, K)? None -> only if N*K <= 2**25
            (sharded: this rank's rows).
        sharded: ``log_p`` is this rank's contiguous shard of the rows of the
            global (N, K) problem, the shards of ranks 0, 1, ... in order (e.g.
            ``selfsup.core.dist.shard(N)``; a rank may hold 0 rows). Every rank of
            the default process group must call with the same lam, tol,
            max_iters and dtype (checked); the column sums are all-reduced
            every iteration (see the module docstring). labels / log_q /
            log_alpha come back for this rank's rows; the scalars are global and
            equal on every rank. The tensors communicated live on ``device``,
            so the backend must support it (gloo: CPU, NCCL: CUDA). With world
            size 1 this is the unsharded solve, bit for bit.

    Returns:
        SinkhornResult (labels, log_q, log scalings, iterations, converged,
        scaling_change, marginal_error, seconds, ...).

    Raises:
        ValueError on a non-tensor, non-2-D, empty or non-floating log_p, NaN
        or +inf in log_p, a row or column with no finite entry, lam <= 0 or
        non-finite, tol < 0, max_iters < 1, chunk_size < 1, or an unsupported
        dtype.
    """
    t_start = time.perf_counter()
    if not isinstance(log_p, torch.Tensor):
        raise ValueError(f"log_p must be a torch.Tensor, got {type(log_p).__name__}")
    sharded = bool(sharded) and _dist.world() > 1
    if sharded and log_p.dim() == 2 and log_p.shape[0] == 0 and log_p.shape[1] >= 1:
        n, k = 0, int(log_p.shape[1])  # an empty shard is fine, an empty problem is not
    else:
        n, k = _check_shape(tuple(log_p.shape), "log_p")
    if not log_p.is_floating_point():
        raise ValueError(f"log_p must be a floating-point tensor, got {log_p.dtype}")
    lam = _check_scalars(lam, tol, max_iters)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    dev = torch.device(device) if device is not None else log_p.device
    log_p = log_p.detach().to(dev)  # no copy when already there
    if return_q is None:
        return_q = n * k <= _AUTO_RETURN_Q_MAX_ELEMS

    shards = _exchange_shards(n, k, lam, tol, max_iters, dtype, dev) if sharded else None
    streaming = chunk_size is not None
    rows = _block_rows(n, k, dev, chunk_size)
    with torch.no_grad():  # pure function of its inputs: never build an autograd graph
        return _solve(_Solver(log_p, lam, dtype, dev, rows, streaming, shards), tol, max_iters, return_q, t_start)


def _exchange_shards(n: int, k: int, lam: float, tol: float, max_iters: int, dtype: torch.dtype,
                     dev: torch.device) -> _Shards:
    """All-gather every rank's row count and settings (one collective): the global N, this
    rank's row offset, and a check (raised on every rank alike) that the ranks agree on K,
    lam, tol, max_iters and dtype and hold at least one row in all."""
    mine = torch.tensor([n, k, lam, tol, max_iters, dtype == torch.float64], dtype=torch.float64, device=dev)
    every = _dist.all_gather(mine).reshape(_dist.world(), -1).cpu()  # (W, 6)
    for j, what in enumerate(("K", "lam", "tol", "max_iters", "dtype"), start=1):
        if not bool((every[:, j] == every[0, j]).all()):
            raise ValueError(f"sharded sinkhorn_knopp: the ranks disagree on {what}: {every[:, j].tolist()}")
    counts = [int(c) for c in every[:, 0].tolist()]
    n_global = sum(counts)
    if n_global < 1:
        raise ValueError(f"log_p must be non-empty: every rank's shard has 0 rows (K = {k})")
    return _Shards(n_global=n_global, offset=sum(counts[: _dist.rank()]))


def _solve(s: _Solver, tol: float, max_iters: int, return_q: bool, t_start: float) -> SinkhornResult:
    """The Sinkhorn-Knopp loop of SeLa sec. 3.1 with the official cadence."""
    # Official order per iteration t (0-based): r_t from c_{t-1}, then c_t
    # from r_t; err(c_{t-1}, c_t) when t % 10 == 0; stop when err <= tol.
    # Iteration 0's column update is done exactly from c_0 = 1/N.
    s.first_column_update()
    converged = False
    stat = math.inf
    iterations = 0
    for t in range(max_iters):
        if t > 0:
            s.column_update()
        check = t % CHECK_EVERY == 0
        alpha_prev = s.log_alpha() if check else None  # (N,)
        s.row_update()
        iterations = t + 1
        if check:
            # mean_i |c_old[i]/c_new[i] - 1| = mean_i |expm1(log c_old - log c_new)|
            stat = s.mean_over_rows(_sliced(lambda a, b: torch.expm1(a - b).abs_(), alpha_prev, s.log_alpha()))
            if stat <= tol:
                converged = True
                break
    if not converged:
        warnings.warn(
            f"sinkhorn_knopp: stopping statistic {stat:.3g} > tol={tol:g} after "
            f"{iterations} iterations (max_iters); labels may be unbalanced",
            RuntimeWarning,
            stacklevel=3,  # the caller of sinkhorn_knopp
        )

    labels, log_q, row_err, col_err = s.finish(return_q)
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    return SinkhornResult(
        labels=labels,
        log_q=log_q,
        log_alpha=s.final_log_alpha,
        log_beta=s.log_beta,
        iterations=iterations,
        converged=converged,
        scaling_change=stat,
        marginal_error=max(row_err, col_err),
        row_error=row_err,
        column_error=col_err,
        kernel_builds=s.kernel_builds,
        seconds=time.perf_counter() - t_start,
    )


# --------------------------------------------------------------------------- #
# Reference (slow, float64, NumPy): literal transcription of the official loop
# --------------------------------------------------------------------------- #
def sinkhorn_reference_numpy(
    p: np.ndarray,
    lam: float,
    tol: float = DEFAULT_TOL,
    max_iters: int = DEFAULT_MAX_ITERS,
) -> ReferenceResult:
    """REFERENCE IMPLEMENTATION for tests and benchmarks -- not for production.

    Follows the official self-label ``cpu_sk`` update literally: P^lambda in
    float64 (linear domain, no stabilisation), per-cluster r and per-sample c
    vectors, r = (1/K) / (P^lam^T c), c = (1/N) / (P^lam r), err =
    nansum(|c / c_new - 1|) evaluated every 10 iterations, labels =
    nanargmax of diag(c) P^lam diag(r) per sample. The only deviations: err is
    divided by N before comparing to ``tol`` (see DEFAULT_TOL; pass 0.1/N for
    the official rule) and there is a ``max_iters`` cap.

    Being unstabilised, it overflows / produces NaN when P^lambda underflows
    (large lambda with peaked P) -- like the official code.

    Args:
        p: (N, K) probabilities (rows need not sum to 1), any real dtype.
    """
    t_start = time.perf_counter()
    lam = _check_scalars(lam, tol, max_iters)
    pk = np.array(p, dtype=np.float64)  # (N, K) private float64 copy
    n, k = _check_shape(pk.shape, "p")
    if np.isnan(pk).any():
        raise ValueError("p contains NaN")
    if (pk < 0).any():
        raise ValueError("p must be non-negative")
    np.power(pk, lam, out=pk)  # (N, K) P^lambda (official: PS **= lamb)
    r = np.full(k, 1.0 / k)  # (K,)
    c = np.full(n, 1.0 / n)  # (N,)
    err = math.inf
    converged = False
    iterations = 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for t in range(max_iters):
            r = (1.0 / k) / (c @ pk)  # (K,)
            c_new = (1.0 / n) / (pk @ r)  # (N,)
            check = t % CHECK_EVERY == 0
            if check:
                err = float(np.nansum(np.abs(c / c_new - 1.0))) / n
            c = c_new
            iterations = t + 1
            if check and err <= tol:
                converged = True
                break
        q = pk  # in place, as the official code: Q = diag(c) P^lam diag(r)
        q *= c[:, None]
        q *= r[None, :]
        total = q.sum()
        q /= total
        try:
            labels = np.nanargmax(q, axis=1).astype(np.int64)  # (N,)
        except ValueError:  # an all-NaN row: the unstabilised iteration broke down
            labels = np.argmax(np.where(np.isnan(q), -np.inf, q), axis=1).astype(np.int64)
        row_err = np.abs(q.sum(axis=1) * n - 1.0).max()
        col_err = np.abs(q.sum(axis=0) * k - 1.0).max()
    return ReferenceResult(
        labels=labels,
        q=q,
        r=r,
        c=c,
        iterations=iterations,
        converged=converged,
        scaling_change=err,
        marginal_error=float(max(row_err, col_err)),
        seconds=time.perf_counter() - t_start,
    )


# --------------------------------------------------------------------------- the maths
@torch.no_grad()
def swav_sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """SwAV's codes (sec. 3.1, eq. 3; appendix A.1 pseudocode; official ``distributed_sinkhorn``).

    scores: (N, K) prototype scores z^T c of this rank's N samples -> (N, K) float32 codes.
    Q = exp(scores / eps) normalised to total mass 1, then ``iters`` times: each prototype (column)
    scaled to mass 1/K, then each sample (row) to mass 1/B, B the number of samples of all ranks;
    returned x B. The last operation is the row normalisation, so each returned row sums to 1
    exactly (up to rounding): every sample's code is a distribution over the prototypes. The
    column (prototype) sums are only approximately B/K (equal partition) after a few iterations.
    With several processes every rank holds its own rows and the sums over samples (the total and
    the per-prototype masses, and the count B) are all-reduced: the codes are those of one process
    on the concatenated rows.

    Why not ``selfsup.cluster.sinkhorn.sinkhorn_knopp``: that solver is SeLa's (the whole dataset, P^lambda
    with log-probabilities, iterated to a tolerance, hard labels out); SwAV runs a fixed 3 iterations on
    a small batch from exp(scores / eps), starting with the prototype normalisation and ending with
    the sample normalisation, and uses the soft codes. Three iterations from another starting point
    or order give other codes, so this is its own small function.

    Numerics: each prototype's column is shifted by its maximum over all samples (all ranks) before
    the exponential. The first column normalisation removes any per-column factor, so the codes are
    unchanged in exact arithmetic, and no column can overflow or vanish (the official code
    exponentiates unshifted; with unit-norm z and c, |scores| <= 1 and exp(1 / 0.05) is still finite).
    """
    s = scores.float()  # (N, K)
    k = s.shape[1]
    b = _dist.all_reduce(torch.tensor(float(s.shape[0]), device=s.device))  # B: samples of all ranks
    col_max = _dist.all_reduce(s.max(dim=0, keepdim=True).values, "max")  # (1, K)
    q = torch.exp((s - col_max) / eps)  # (N, K)
    q /= _dist.all_reduce(q.sum())
    for _ in range(iters):
        q /= _dist.all_reduce(q.sum(dim=0, keepdim=True))  # (1, K): each prototype's mass over all samples
        q /= k
        q /= q.sum(dim=1, keepdim=True)  # (N, 1): each sample's mass (rows are local)
        q /= b
    return q * b

"""PCA-whitening with faiss, then L2 normalisation (DeepCluster sec. 3.2 / official
``preprocess_features``: ``faiss.PCAMatrix(d, pca_dim, eigen_power=-0.5)`` then rows
divided by their norm)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np

log = logging.getLogger("selfsup.cluster.pca")
RANK_TOL = 1e-6  # an eigenvalue under this x the largest counts as zero (float32 features)


def capped_dim(dim: int, n: int, d: int, key: str) -> int:
    """``dim`` capped at the most axes ``n`` samples of dimension ``d`` can span once centred
    (``min(d, n - 1)``), with one warning line naming ``key``: a small folder runs with the defaults."""
    cap = min(d, n - 1)
    if cap < 1:
        raise ValueError(f"{key}: PCA needs at least 2 samples, got {n}")
    if dim > cap:
        log.warning("%s: %d is more than %d samples of dimension %d can span; using %d", key, dim, n, d, cap)
        return cap
    return dim


@dataclass
class PCAWhitening:
    """A fitted whitening map x -> x @ A^T + b, A (dim, d_in); plain arrays, so it saves as .npz."""

    matrix: np.ndarray  # (dim, d_in): faiss' A, rows already scaled by eigenvalue^-0.5
    bias: np.ndarray  # (dim,): -A @ mean

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[0])

    @classmethod
    def fit(cls, x: np.ndarray, dim: int, eig_floor: float = 0.0, key: str = "pca_dim") -> "PCAWhitening":
        """Whitening onto ``dim`` axes (``key``: the param that set it, for the messages).

        ``dim`` is capped at the features' rank with one warning line: at ``min(d_in, N - 1)``, then,
        with ``eig_floor`` 0, at the numerical rank (eigenvalues above ``RANK_TOL`` x the largest; a
        (near-)zero one would blow noise up to unit variance). ``eig_floor`` > 0: eigenvalues below
        ``eig_floor`` x the largest are whitened as if they were that (a bounded noise amplification,
        like faiss' PCAMatrix ``epsilon``) and no axis is dropped."""
        x = np.ascontiguousarray(x, dtype=np.float32)  # (N, d_in)
        n, d = x.shape
        dim = capped_dim(dim, n, d, key)
        pca = faiss.PCAMatrix(d, dim, -0.5)  # eigen_power -0.5: scale each axis by 1/sqrt(eigenvalue)
        pca.train(x)
        eig = faiss.vector_to_array(pca.eigenvalues)[:dim]  # descending
        floor = eig_floor * eig[0]
        keep = dim
        if not eig_floor:
            keep = max(1, int((eig > RANK_TOL * eig[0]).sum()))
            if keep < dim:
                log.warning("%s: %d exceeds the numerical rank %d of the features (%d x %d); using %d",
                            key, dim, keep, n, d, keep)
        # faiss' eigenvalues are those of the scatter matrix X^T X (not divided by N), so
        # its "whitened" output has variance 1/N per axis; scale by sqrt(N) for a true
        # whitening (identity covariance). DeepCluster's L2 step makes the two identical.
        # The leading ``keep`` rows of a dim-axis PCA are the keep-axis PCA.
        scale = np.float32(np.sqrt(n))
        a = faiss.vector_to_array(pca.A).reshape(dim, d)[:keep] * scale
        b = faiss.vector_to_array(pca.b)[:keep] * scale
        eig = eig[:keep]
        if eig_floor:  # rows were scaled by eig^-0.5; those under the floor get floor^-0.5 instead
            f = np.sqrt(np.maximum(eig, 1e-30) / np.maximum(eig, floor)).astype(np.float32)  # (dim,) <= 1
            a, b = a * f[:, None], b * f
        return cls(a.astype(np.float32), b.astype(np.float32))

    def transform(self, x: np.ndarray, l2: bool = True) -> np.ndarray:
        y = np.asarray(x, np.float32) @ self.matrix.T + self.bias  # (N, dim)
        if l2:
            y /= np.linalg.norm(y, axis=1, keepdims=True) + 1e-10
        return y


def pca_project(train: np.ndarray, test: np.ndarray, dim: int, key: str = "pca_dim") -> tuple[np.ndarray, np.ndarray]:
    """Plain PCA (no whitening): (N, d) and (M, d) -> their projections on the ``dim`` leading axes of
    ``train`` (centred with its mean); SeLa's kNN on PCA-128 fc7 features. ``dim`` is capped at
    ``min(d, N - 1)`` with a warning naming ``key`` (a rotation needs no rank check: a zero-variance
    axis projects to a constant)."""
    x = np.ascontiguousarray(train, dtype=np.float32)
    if dim < 1:
        raise ValueError(f"{key}: must be >= 1, got {dim}")
    dim = capped_dim(dim, len(x), x.shape[1], key)
    pca = faiss.PCAMatrix(x.shape[1], dim, 0.0)  # eigen_power 0: a rotation, no rescaling
    pca.train(x)
    return pca.apply(x), pca.apply(np.ascontiguousarray(test, dtype=np.float32))


def pca_whiten(x: np.ndarray, dim: int, l2: bool = True, eig_floor: float = 0.0, key: str = "pca_dim") -> np.ndarray:
    """Fit on ``x`` and transform it: (N, d_in) -> (N, dim) whitened (and unit-norm rows; ``dim`` capped
    as ``PCAWhitening.fit`` says)."""
    return PCAWhitening.fit(x, dim, eig_floor, key).transform(x, l2=l2)

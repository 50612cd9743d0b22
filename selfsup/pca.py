"""PCA-whitening with faiss, then L2 normalisation (DeepCluster sec. 3.2 / official
``preprocess_features``: ``faiss.PCAMatrix(d, pca_dim, eigen_power=-0.5)`` then rows
divided by their norm)."""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


@dataclass
class PCAWhitening:
    """A fitted whitening map x -> x @ A^T + b, A (dim, d_in); plain arrays, so it saves as .npz."""

    matrix: np.ndarray  # (dim, d_in): faiss' A, rows already scaled by eigenvalue^-0.5
    bias: np.ndarray  # (dim,): -A @ mean

    @classmethod
    def fit(cls, x: np.ndarray, dim: int, eig_floor: float = 0.0) -> "PCAWhitening":
        """``eig_floor`` > 0: eigenvalues below ``eig_floor`` x the largest are whitened as if they
        were that (a bounded noise amplification, like faiss' PCAMatrix ``epsilon``) instead of the
        fit refusing rank-deficient features; 0 refuses them (the features' rank is below ``dim``)."""
        x = np.ascontiguousarray(x, dtype=np.float32)  # (N, d_in)
        n, d = x.shape
        if dim > d:
            raise ValueError(f"pca_dim: {dim} is larger than the feature dimension {d}")
        if dim >= n:
            raise ValueError(f"pca_dim: {dim} must be smaller than the number of samples {n}")
        pca = faiss.PCAMatrix(d, dim, -0.5)  # eigen_power -0.5: scale each axis by 1/sqrt(eigenvalue)
        pca.train(x)
        eig = faiss.vector_to_array(pca.eigenvalues)[:dim]  # descending
        floor = eig_floor * eig[0]
        if not eig_floor and not eig[-1] > 1e-6 * eig[0]:
            # a (near-)zero eigenvalue would blow noise up to unit variance
            raise ValueError(f"pca_dim: {dim} exceeds the numerical rank of the features; lower it "
                             f"(or set an eigenvalue floor)")
        # faiss' eigenvalues are those of the scatter matrix X^T X (not divided by N), so
        # its "whitened" output has variance 1/N per axis; scale by sqrt(N) for a true
        # whitening (identity covariance). DeepCluster's L2 step makes the two identical.
        scale = np.float32(np.sqrt(n))
        a = faiss.vector_to_array(pca.A).reshape(dim, d) * scale
        b = faiss.vector_to_array(pca.b) * scale
        if eig_floor:  # rows were scaled by eig^-0.5; those under the floor get floor^-0.5 instead
            f = np.sqrt(np.maximum(eig, 1e-30) / np.maximum(eig, floor)).astype(np.float32)  # (dim,) <= 1
            a, b = a * f[:, None], b * f
        return cls(a.astype(np.float32), b.astype(np.float32))

    def transform(self, x: np.ndarray, l2: bool = True) -> np.ndarray:
        y = np.asarray(x, np.float32) @ self.matrix.T + self.bias  # (N, dim)
        if l2:
            y /= np.linalg.norm(y, axis=1, keepdims=True) + 1e-10
        return y


def pca_project(train: np.ndarray, test: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain PCA (no whitening): (N, d) and (M, d) -> their projections on the ``dim`` leading axes of
    ``train`` (centred with its mean); SeLa's kNN on PCA-128 fc7 features."""
    x = np.ascontiguousarray(train, dtype=np.float32)
    if not 0 < dim <= x.shape[1] or dim >= len(x):
        raise ValueError(f"pca_dim: {dim} must be in 1..{min(x.shape[1], len(x) - 1)}")
    pca = faiss.PCAMatrix(x.shape[1], dim, 0.0)  # eigen_power 0: a rotation, no rescaling
    pca.train(x)
    return pca.apply(x), pca.apply(np.ascontiguousarray(test, dtype=np.float32))


def pca_whiten(x: np.ndarray, dim: int, l2: bool = True, eig_floor: float = 0.0) -> np.ndarray:
    """Fit on ``x`` and transform it: (N, d_in) -> (N, dim) whitened (and unit-norm rows)."""
    return PCAWhitening.fit(x, dim, eig_floor).transform(x, l2=l2)

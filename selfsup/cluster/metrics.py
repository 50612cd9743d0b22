"""Clustering metrics: NMI and ARI (scikit-learn), Hungarian-matched accuracy (scipy).

scikit-learn and scipy are imported when a metric is computed, not with this module: the training
of the clustering methods imports it, and a training stage (one per method) would otherwise pay
their import, about 1.3 s of its start (``python benchmarks/imports.py``), before any work."""
from __future__ import annotations

import numpy as np


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """NMI(A; B) = I(A; B) / sqrt(H(A) H(B)): DeepCluster's definition (sec. 5.1), i.e.
    scikit-learn's 'geometric' normalisation (its default before 0.22, which the
    official code ran on)."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(a, b, average_method="geometric"))


def ari(a: np.ndarray, b: np.ndarray) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(a, b))


def hungarian_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Accuracy under the best one-to-one cluster->class matching.

    With more clusters than classes, unmatched clusters count as errors (the
    matching is one-to-one, as in the deep-clustering literature).
    """
    from scipy.optimize import linear_sum_assignment

    labels, clusters = np.asarray(labels), np.asarray(clusters)
    _, li = np.unique(labels, return_inverse=True)
    _, ci = np.unique(clusters, return_inverse=True)
    conf = np.zeros((ci.max() + 1, li.max() + 1), dtype=np.int64)  # (clusters, classes)
    np.add.at(conf, (ci, li), 1)
    r, c = linear_sum_assignment(conf, maximize=True)
    return float(conf[r, c].sum() / len(labels))

"""Evaluation protocols on frozen features, with the label bookkeeping in one place.

Samples labelled -1 are unlabelled: they are dropped from every supervised metric.
If a split has no labels at all, the protocol returns ``{"skipped": reason}`` (and
logs the reason) instead of failing, so unlabelled datasets still run the DAG.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from selfsup.core.config import ConfigError
from selfsup.eval.knn import knn_eval

# scikit-learn/scipy (selfsup.cluster.metrics, ~1.3 s to import: benchmarks/imports.py) and torch (selfsup.eval.linear_probe) are
# imported inside the protocols that need them: each DVC stage is a new process, and the
# kNN stage needs neither.

log = logging.getLogger("selfsup.eval.protocols")


def no_labels(ytr: np.ndarray, yte: np.ndarray) -> str | None:
    """Why a label-based evaluation cannot run (a split without a labelled sample), or None."""
    if not (ytr >= 0).any() or not (yte >= 0).any():
        return f"skipped, the {'train' if not (ytr >= 0).any() else 'test'} split has no labels"
    return None


def _skip(what: str, ytr: np.ndarray, yte: np.ndarray, quiet: bool = False) -> dict[str, Any] | None:
    if (reason := no_labels(ytr, yte)) is not None:
        if not quiet:
            log.warning(f"{what}: {reason}")
        return {"skipped": f"{what}: {reason}"}
    return None


def knn_protocols(tr: np.ndarray, ytr: np.ndarray, te: np.ndarray, yte: np.ndarray, ks: list[int],
                  temperature: float, num_classes: int, paper: dict[str, Any] | None = None) -> dict[str, Any]:
    """Weighted kNN for every k in ``ks`` at one temperature (the common protocol):
    {"k200_top1": .., "k200_top5": .., "top1": <first k>, "protocol": ...}; and, when
    ``paper`` is given (``paper_protocol``'s dict, with "features" = (train, ytrain, test, ytest) when the
    protocol reads other features than ``tr`` / ``te``), the method's own protocol as "paper_top1"
    (+ "paper_protocol")."""
    if (s := _skip("knn", ytr, yte)) is not None:
        return s
    mtr, mte = ytr >= 0, yte >= 0
    out: dict[str, Any] = {"temperature": temperature}
    for i, k in enumerate(ks):
        r = knn_eval(tr[mtr], ytr[mtr], te[mte], yte[mte], k, temperature, num_classes)
        for key, v in r.items():
            out[f"k{k}_{key}"] = v
        if i == 0:
            out["top1"] = r["top1"]
            out["protocol"] = f"weighted kNN k={r['k_used']} T={temperature}"
    if paper is not None:
        k, t, where = paper["k"], paper["temperature"], paper["where"]
        if "features" in paper:  # the eval head's features: (train, train labels, test, test labels)
            tr, ytr, te, yte = paper["features"]
            mtr, mte = ytr >= 0, yte >= 0
        if paper.get("pca_dim"):  # fitted on the training features, labelled or not
            from selfsup.cluster.pca import pca_project

            tr, te = pca_project(tr, te, paper["pca_dim"], paper.get("key", "knn.paper.pca_dim"))
            where = f"{where} + PCA-{paper['pca_dim']}"
        r = knn_eval(tr[mtr], ytr[mtr], te[mte], yte[mte], k, t, num_classes)
        out["paper_top1"] = r["top1"]
        out["paper_protocol"] = f"weighted kNN k={r['k_used']} T={t:g} on {where}"
    return out


def paper_protocol(key: str, k: int, temperature: float, features: str, protocol: dict[str, Any],
                   pca_dim: int = 0) -> dict[str, Any]:
    """A method's paper kNN protocol (``knn.paper.<m>``, named ``key``) resolved against what its
    encoder file carries (``protocol``: the extract stage's protocol.json): temperature 0 = the
    training temperature; ``features: head`` needs the method to have an eval head."""
    t = temperature or protocol.get("temperature")
    if not t:
        raise ConfigError(f"{key}.temperature: 0 asks for the method's training temperature, but its encoder "
                          f"has none; set a number")
    head = protocol.get("head")
    if features == "head" and head is None:
        raise ConfigError(f"{key}.features: head, but the method saved no eval head; use backbone")
    where = "backbone"
    if features == "head":
        parts = (["ReLU"] if head.get("relu") else []) + ([f"{head['proj']['kind']} head {head['proj']['out_dim']}-d"]
                                                        if head.get("proj") else []) + (["L2"] if head.get("l2") else [])
        where = " + ".join(parts) or "backbone"
    return {"k": k, "temperature": float(t), "where": where, "pca_dim": pca_dim, "key": f"{key}.pca_dim"}


def linear_eval(tr: np.ndarray, ytr: np.ndarray, te: np.ndarray, yte: np.ndarray, num_classes: int, epochs: int,
                batch_size: int, lr: float, weight_decay: float, seed: int, device: Any,
                **probe: Any) -> dict[str, Any]:
    """``probe``: linear_probe's schedule and classifier options (``lr_at``, ``nesterov``, ``classifier``:
    the per-layer probes' keys)."""
    if (s := _skip("linear", ytr, yte)) is not None:
        return s
    from selfsup.eval.linear_probe import linear_probe  # torch: only this protocol needs it

    mtr, mte = ytr >= 0, yte >= 0
    return linear_probe(tr[mtr], ytr[mtr], te[mte], yte[mte], num_classes, epochs, batch_size, lr,
                        weight_decay, seed, device, **probe)


def cluster_eval(tr: np.ndarray, ytr: np.ndarray, te: np.ndarray, yte: np.ndarray, k: int, niter: int,
                 nredo: int, seed: int, init: str = "kmeans++", quiet: bool = False) -> dict[str, Any]:
    """k-means on the training features (all of them, labelled or not); metrics against the
    labels on train, and on test via nearest centroid. The headline numbers are train's. Without
    labels only the objective (``quiet``: the caller has said why the label metrics skip)."""
    from selfsup.cluster.kmeans import assign_to_centroids, faiss_gpu, kmeans
    from selfsup.cluster.metrics import ari, hungarian_accuracy, nmi

    km = kmeans(tr, k, niter=niter, seed=seed, nredo=nredo, init=init, gpu=faiss_gpu())
    out: dict[str, Any] = {"k": k, "objective": km.objective}
    if (s := _skip("cluster", ytr, yte, quiet)) is not None:
        return {**out, **s}
    test_assign = assign_to_centroids(te, km.centroids)
    for split, y, a in (("train", ytr, km.assign), ("test", yte, test_assign)):
        m = y >= 0
        prefix = "" if split == "train" else "test_"
        out[f"{prefix}nmi"] = nmi(y[m], a[m])
        out[f"{prefix}ari"] = ari(y[m], a[m])
        out[f"{prefix}acc"] = 100.0 * hungarian_accuracy(y[m], a[m])
    return out


def svm_eval(tr: np.ndarray, ytr: np.ndarray, te: np.ndarray, yte: np.ndarray, c: float, seed: int) -> dict[str, Any]:
    """Linear SVM (scikit-learn's LinearSVC = liblinear, one-vs-rest, squared hinge, cost ``c``) on
    L2-normalised frozen features: {"svm_top1": percent on the labelled test rows, "svm_c": c}."""
    if (s := _skip("svm", ytr, yte)) is not None:
        return {"svm_" + k: v for k, v in s.items()}
    from sklearn.svm import LinearSVC

    mtr, mte = ytr >= 0, yte >= 0

    def l2(x: np.ndarray) -> np.ndarray:  # (N, D) rows to unit length
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    clf = LinearSVC(C=c, dual="auto", max_iter=10_000, random_state=seed).fit(l2(tr[mtr]), ytr[mtr])
    acc = float((clf.predict(l2(te[mte])) == yte[mte]).mean())
    return {"svm_top1": 100.0 * acc, "svm_c": c}

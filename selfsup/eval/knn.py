"""Weighted k-nearest-neighbour classifier on frozen features (InstDisc sec. 3.5, DINO).

Cosine similarity of L2-normalised features; the top-k training neighbours vote
for their class with weight exp(sim / T). faiss does the search (exact inner
product; on the GPUs when faiss has GPU support: the ``gpu`` install extra).
"""
from __future__ import annotations

import faiss
import numpy as np

from selfsup.cluster.kmeans import faiss_gpu


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)


def knn_predict_scores(
    train: np.ndarray, train_y: np.ndarray, test: np.ndarray, k: int, temperature: float,
    num_classes: int, batch: int = 4096,
) -> np.ndarray:
    """(Nte, num_classes) vote scores. k is capped at the training set size."""
    tr, te = l2n(train), l2n(test)  # (Ntr, D), (Nte, D)
    k = min(k, len(tr))
    index = faiss.IndexFlatIP(tr.shape[1])
    if faiss_gpu():
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(tr)
    scores = np.zeros((len(te), num_classes), np.float64)
    for s in range(0, len(te), batch):
        sim, idx = index.search(te[s : s + batch], k)  # (b, k) each
        w = np.exp(sim.astype(np.float64) / temperature)  # (b, k)
        rows = np.repeat(np.arange(len(idx)), k)
        np.add.at(scores[s : s + batch], (rows, train_y[idx].reshape(-1)), w.reshape(-1))
    return scores


def topk_accuracy(scores: np.ndarray, y: np.ndarray, k: int) -> float:
    # ties broken by class index (stable sort of the negated scores)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == y[:, None]).any(axis=1).mean())


def knn_eval(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray,
             k: int, temperature: float, num_classes: int) -> dict[str, float]:
    scores = knn_predict_scores(train, train_y, test, k, temperature, num_classes)
    out = {"top1": 100.0 * topk_accuracy(scores, test_y, 1), "k_used": min(k, len(train))}
    if num_classes >= 5:
        out["top5"] = 100.0 * topk_accuracy(scores, test_y, 5)
    return out

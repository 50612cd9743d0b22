"""Exact / invariant checks of the shared numeric parts: PCA-whitening, k-means, the
uniform sampler, clustering metrics, weighted kNN."""
import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from selfsup.cluster.kmeans import assign_to_centroids, kmeans
from selfsup.eval.knn import knn_eval, knn_predict_scores
from selfsup.cluster.metrics import ari, hungarian_accuracy, nmi
from selfsup.cluster.pca import PCAWhitening, pca_whiten
from selfsup.cluster.sampler import uniform_cluster_indices


def correlated(n=2000, d=40, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 5.0).astype(np.float32)


def test_whitening_identity_covariance_and_unit_rows():
    x = correlated()
    w = PCAWhitening.fit(x, 16)
    y = w.transform(x, l2=False)  # (N, 16)
    assert y.shape == (2000, 16)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-3)
    cov = np.cov(y, rowvar=False, bias=True)
    np.testing.assert_allclose(cov, np.eye(16), atol=2e-3)
    z = pca_whiten(x, 16)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    # the kept dimensions are the top principal axes: whitened y = PCA projection / sqrt(eig)
    xc = x - x.mean(0)
    evals, evecs = np.linalg.eigh(np.cov(xc, rowvar=False, bias=True))
    ref = xc @ evecs[:, ::-1][:, :16] / np.sqrt(evals[::-1][:16])
    np.testing.assert_allclose(np.abs(ref), np.abs(y), atol=2e-2)


def test_whitening_caps_its_dimension_at_the_rank(caplog):
    """A dimension above what the features span is capped with one warning naming the key: at the
    feature dimension, at N - 1 samples, at the numerical rank; the kept axes are still whitened."""
    x = correlated(n=100, d=8)
    caplog.set_level("WARNING", logger="selfsup.cluster.pca")
    assert PCAWhitening.fit(x, 9, key="whiten.pca_dim").dim == 8
    assert PCAWhitening.fit(x[:5], 8, key="whiten.pca_dim").dim == 4  # 5 centred samples span 4 axes
    low = np.repeat(x[:, :4], 2, axis=1)  # rank 4 in 8-d: 6 dims would blow noise up to unit variance
    w = PCAWhitening.fit(low, 6, key="whiten.pca_dim")
    assert w.dim == 4
    y = w.transform(low, l2=False)  # (100, 4)
    np.testing.assert_allclose(np.cov(y, rowvar=False, bias=True), np.eye(4), atol=2e-3)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 3 and all(m.startswith("whiten.pca_dim: ") for m in msgs), msgs
    assert "numerical rank 4" in msgs[2], msgs
    with pytest.raises(ValueError, match="whiten.pca_dim: PCA needs at least 2 samples"):
        PCAWhitening.fit(x[:1], 4, key="whiten.pca_dim")
    # full rank and small enough: no warning, the dimension asked for
    caplog.clear()
    assert PCAWhitening.fit(x, 6).dim == 6 and not caplog.records


def test_kmeans_objective_matches_sklearn():
    x, _ = make_blobs(n_samples=3000, centers=12, n_features=16, cluster_std=2.0, random_state=0)
    x = x.astype(np.float32)
    # k-means++ seeding on well-separated blobs: as good as scikit-learn (same restarts)
    ref = KMeans(12, n_init=10, random_state=0).fit(x)
    ours = kmeans(x, 12, niter=50, seed=1, nredo=10, init="kmeans++")
    assert ours.objective <= 1.01 * ref.inertia_
    # faiss' own random seeding (DeepCluster's default) on features that are not
    # separated blobs, like whitened CNN features
    z = correlated(n=3000, d=16)
    ref_z = KMeans(12, n_init=3, random_state=0).fit(z)
    ours_z = kmeans(z, 12, niter=50, seed=1, nredo=3)
    assert abs(ours_z.objective - ref_z.inertia_) / ref_z.inertia_ < 0.01
    # the objective we report is the sum of squared distances of the returned assignment
    d = ((x - ours.centroids[ours.assign]) ** 2).sum()
    assert abs(d - ours.objective) / d < 1e-4
    np.testing.assert_array_equal(assign_to_centroids(x, ours.centroids), ours.assign)


def test_kmeans_errors():
    with pytest.raises(ValueError, match="k: 11"):
        kmeans(np.zeros((10, 2), np.float32), 11)


def test_uniform_sampler_counts():
    rng = np.random.default_rng(0)
    assign = np.concatenate([np.zeros(500), np.ones(40), np.full(3, 5), np.full(157, 2)]).astype(int)
    rng.shuffle(assign)
    order = uniform_cluster_indices(assign, seed=3)
    assert len(order) == len(assign) == 700
    counts = np.bincount(assign[order], minlength=6)
    nonempty = counts[[0, 1, 2, 5]]
    assert counts[3] == counts[4] == 0  # empty clusters get nothing
    assert nonempty.max() - nonempty.min() <= 1 and nonempty.sum() == 700  # 175 each
    # a big cluster is sampled without replacement, a tiny one with
    big = order[assign[order] == 0]
    assert len(np.unique(big)) == len(big)
    assert set(order[assign[order] == 5]) == set(np.flatnonzero(assign == 5))
    np.testing.assert_array_equal(order, uniform_cluster_indices(assign, seed=3))
    assert not np.array_equal(order, uniform_cluster_indices(assign, seed=4))
    assert len(uniform_cluster_indices(assign, n=1400, seed=0)) == 1400


def test_clustering_metrics_hand_cases():
    y = np.array([0, 0, 1, 1, 2, 2])
    assert nmi(y, np.array([5, 5, 3, 3, 9, 9])) == pytest.approx(1.0)
    assert ari(y, np.array([5, 5, 3, 3, 9, 9])) == pytest.approx(1.0)
    assert hungarian_accuracy(y, np.array([5, 5, 3, 3, 9, 9])) == pytest.approx(1.0)
    # one error: cluster 1 gets a sample of class 2
    assert hungarian_accuracy(y, np.array([0, 0, 1, 1, 1, 2])) == pytest.approx(5 / 6)
    # everything in one cluster: one class matched
    assert hungarian_accuracy(y, np.zeros(6, int)) == pytest.approx(2 / 6)
    assert nmi(y, np.zeros(6, int)) == pytest.approx(0.0)
    # NMI geometric by hand: A = [0,0,1,1], B = [0,0,0,1]
    a, b = np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])
    ha = np.log(2)
    hb = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    mi = 0.5 * np.log(0.5 / (0.5 * 0.75)) + 0.25 * np.log(0.25 / (0.5 * 0.75)) + 0.25 * np.log(0.25 / (0.5 * 0.25))
    assert nmi(a, b) == pytest.approx(mi / np.sqrt(ha * hb))
    assert ari(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) == pytest.approx(-0.5)


def brute_knn_scores(tr, ytr, te, k, t, c):
    tr = tr / np.linalg.norm(tr, axis=1, keepdims=True)
    te = te / np.linalg.norm(te, axis=1, keepdims=True)
    out = np.zeros((len(te), c))
    for i, q in enumerate(te):
        sim = tr @ q
        nn = np.argsort(-sim, kind="stable")[:k]
        for j in nn:
            out[i, ytr[j]] += np.exp(sim[j] / t)
    return out


def test_weighted_knn_equals_brute_force():
    rng = np.random.default_rng(0)
    tr, te = rng.normal(size=(300, 12)).astype(np.float32), rng.normal(size=(50, 12)).astype(np.float32)
    ytr, yte = rng.integers(0, 6, 300), rng.integers(0, 6, 50)
    for k in (1, 20, 200):
        ours = knn_predict_scores(tr, ytr, te, k, 0.07, 6)
        ref = brute_knn_scores(tr, ytr, te, k, 0.07, 6)
        np.testing.assert_allclose(ours, ref, rtol=1e-4)
    # k is capped at the training-set size
    capped = knn_eval(tr[:30], ytr[:30], te, yte, 200, 0.07, 6)
    assert capped["k_used"] == 30
    ref = brute_knn_scores(tr[:30], ytr[:30], te, 30, 0.07, 6)
    assert capped["top1"] == pytest.approx(100 * (ref.argmax(1) == yte).mean())
    assert "top5" in capped and "top5" not in knn_eval(tr, ytr % 3, te, yte % 3, 20, 0.07, 3)


def test_knn_paper_protocol_beside_the_common_one():
    from selfsup.eval.protocols import knn_protocols
    from selfsup.eval.knn import knn_eval

    rng = np.random.default_rng(3)
    tr, te = rng.normal(size=(120, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
    ytr, yte = rng.integers(0, 6, 120), rng.integers(0, 6, 40)
    out = knn_protocols(tr, ytr, te, yte, [200, 20], 0.07, 6, paper={"k": 10, "temperature": 0.1, "where": "backbone"})
    assert out["paper_protocol"] == "weighted kNN k=10 T=0.1 on backbone"
    assert out["paper_top1"] == knn_eval(tr, ytr, te, yte, 10, 0.1, 6)["top1"]
    assert out["k200_k_used"] == 120 and out["top1"] == out["k200_top1"]
    assert "paper_top1" not in knn_protocols(tr, ytr, te, yte, [20], 0.07, 6)


def test_linear_probe_ignores_a_feature_constant_on_the_training_split():
    """Issue 12.5: a feature constant on train but not on test must not swamp the probe (dividing by
    std + 1e-6 blew it up a million-fold: 25 % top-1 on this set)."""
    from selfsup.eval.linear_probe import linear_probe

    rng = np.random.default_rng(0)
    ytr, yte = rng.integers(0, 2, 400), rng.integers(0, 2, 200)
    tr = np.c_[ytr * 4.0 + rng.normal(0, 0.3, 400), rng.normal(0, 1, 400), np.full(400, 0.5)].astype(np.float32)
    te = np.c_[yte * 4.0 + rng.normal(0, 0.3, 200), rng.normal(0, 1, 200), rng.normal(0.5, 0.2, 200)]
    out = linear_probe(tr, ytr, te.astype(np.float32), yte, 2, epochs=20, batch_size=64, lr=0.1,
                       weight_decay=0.0, seed=0, device=torch.device("cpu"))
    assert out["top1"] == 100.0, out


def test_svm_on_l2_normalised_features():
    """Linear SVM (InstDisc Table 1's linear column): separable classes are classified exactly, the
    rows are L2-normalised first (rescaling a row changes nothing), unlabelled splits are skipped."""
    from selfsup.eval.protocols import svm_eval

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 5
    ytr, yte = rng.integers(0, 4, 200), rng.integers(0, 4, 80)
    tr = (centres[ytr] + rng.normal(size=(200, 16))).astype(np.float32)
    te = (centres[yte] + rng.normal(size=(80, 16))).astype(np.float32)
    out = svm_eval(tr, ytr, te, yte, c=1.0, seed=0)
    assert out["svm_top1"] == 100.0
    scaled = svm_eval(tr * rng.uniform(0.1, 10, (200, 1)), ytr, te * rng.uniform(0.1, 10, (80, 1)), yte, 1.0, 0)
    assert scaled["svm_top1"] == out["svm_top1"]
    # a noisy problem: equal to liblinear on explicitly normalised rows, and not to the raw rows
    from sklearn.svm import LinearSVC
    n_tr = (centres[ytr] / 20 + rng.normal(size=(200, 16))) * rng.uniform(0.01, 100, (200, 1))
    n_te = (centres[yte] / 20 + rng.normal(size=(80, 16))) * rng.uniform(0.01, 100, (80, 1))

    def acc(a, b):
        pred = LinearSVC(C=1.0, dual="auto", max_iter=10_000, random_state=0).fit(a, ytr).predict(b)
        return 100.0 * (pred == yte).mean()

    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    got = svm_eval(n_tr, ytr, n_te, yte, 1.0, 0)["svm_top1"]
    assert got == pytest.approx(acc(unit(n_tr), unit(n_te))) and got < 100.0 and got != acc(n_tr, n_te)
    assert "svm_skipped" in svm_eval(tr, -np.ones(200, int), te, yte, 1.0, 0)

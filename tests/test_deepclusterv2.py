"""DeepCluster-v2: spherical k-means against a slow NumPy transcription of the official
``cluster_memory`` (empty clusters keep their centroid), unit centroids, the memory filled before the
first epoch and the prototypes / targets set to the k-means of it at each epoch start, frozen prototypes,
the loss against a per-sample reference, an exact resume after a kill, and the digits default beating
the random-init encoder. Two gloo processes: tests/test_swav_dist.py."""
import math

import numpy as np
import torch
import torch.nn.functional as F

from conftest import assert_resume_is_exact, knn_after_pretrain, make_cfg
from selfsup.core.io import derive_seed
from selfsup.engine.contract import TrainContext
from selfsup.cluster.spherical_kmeans import spherical_kmeans
from selfsup.losses.prototypes import IGNORE, deepclusterv2_loss
from selfsup.data.batches import batch_maker
from selfsup.engine.loop import build_method

# the digits defaults of the deepclusterv2 block proposed for params.yaml
DCV2 = {"epochs": 10, "batch_size": 128, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "cosine",
        "augment": "crop", "crop_scale": [0.5, 1.0], "jitter": [0.4, 0.4, 0.4, 0.1], "jitter_p": 0.8,
        "grayscale_p": 0.0, "blur_p": 0.0, "n_large": 2, "n_small": 2, "small_size": 6, "small_scale": [0.3, 0.7],
        "proj_hidden": 256, "feat_dim": 64, "prototypes": [100, 100, 100], "temperature": 0.1, "kmeans_iters": 10,
        "crops_for_assign": [0, 1], "freeze_prototypes_iters": 300000}


def subset(data, n=400):
    from selfsup.data.prepared import Data, Split

    return Data(Split(data.train.x[:n], data.train.y[:n]), data.test, {**data.meta, "n_train": n})


def reference_kmeans(x, init_rows, iters):
    """The official cluster_memory on one process, row by row in float64 NumPy."""
    x = x.astype(np.float64)
    c = x[init_rows].copy()
    for it in range(iters + 1):
        assign = np.array([int(np.argmax([row @ cen for cen in c])) for row in x])
        if it == iters:
            return c, assign
        for j in range(len(c)):
            members = x[assign == j]
            if len(members):  # empty: the centroid stays
                c[j] = members.mean(axis=0)
            c[j] = c[j] / np.linalg.norm(c[j])


def test_spherical_kmeans_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(300, 8, generator=g) + 2.0 * torch.randn(6, 8, generator=g).repeat(50, 1), dim=1)
    res = spherical_kmeans(x, 12, 10, torch.Generator().manual_seed(3))
    init = torch.randperm(300, generator=torch.Generator().manual_seed(3))[:12].numpy()
    c, a = reference_kmeans(x.numpy(), init, 10)
    assert np.array_equal(res.assign.numpy(), a)
    assert np.allclose(res.centroids.numpy(), c, atol=1e-6)
    assert torch.allclose(res.centroids.norm(dim=1), torch.ones(12), atol=1e-6)  # unit centroids
    assert res.counts.sum() == 300 and torch.equal(res.counts, torch.bincount(res.assign, minlength=12))
    ref_obj = np.mean([x.numpy()[i].astype(np.float64) @ c[a[i]] for i in range(300)])
    assert abs(res.objective - ref_obj) < 1e-6


def test_an_empty_cluster_keeps_its_centroid():
    # 3 distinct points, each 10 times; 5 centroids: two initial centroids land on one point, the
    # later one never wins a tie (argmax takes the first), its cluster stays empty
    g = torch.Generator().manual_seed(1)
    pts = F.normalize(torch.randn(3, 4, generator=g), dim=1)
    x = pts.repeat(10, 1)  # (30, 4)
    gen = torch.Generator().manual_seed(0)
    res = spherical_kmeans(x, 5, 5, gen)
    init = torch.randperm(30, generator=torch.Generator().manual_seed(0))[:5]
    c, a = reference_kmeans(x.numpy(), init.numpy(), 5)
    empty = (res.counts == 0).nonzero().flatten()
    assert len(empty) >= 2 and np.array_equal(res.assign.numpy(), a)
    for j in empty.tolist():
        assert torch.allclose(res.centroids[j], x[init[j]], atol=1e-6)  # the initial centroid, unchanged
    assert np.allclose(res.centroids.numpy(), c, atol=1e-6)


def test_loss_matches_a_per_sample_reference():
    torch.manual_seed(0)
    v, b, ks, t = 3, 4, [5, 7], 0.1
    scores = [torch.randn(v * b, k, requires_grad=True) for k in ks]
    targets = torch.tensor([[0, 4, 2, IGNORE], [6, 1, 1, 3]])
    loss = deepclusterv2_loss(scores, targets, t)
    ref = 0.0
    for h, k in enumerate(ks):
        terms = []
        for crop in range(v):
            for n in range(b):
                y = int(targets[h, n])
                if y == IGNORE:
                    continue
                logits = [float(scores[h].detach()[crop * b + n, j]) / t for j in range(k)]
                lse = math.log(sum(math.exp(x) for x in logits))
                terms.append(lse - logits[y])
        ref += sum(terms) / len(terms)
    assert abs(float(loss.detach()) - ref / len(ks)) < 1e-5


def test_memory_clustering_sets_prototypes_and_targets(digits):
    data = subset(digits, 300)
    cfg = make_cfg(methods=["deepclusterv2"], deepclusterv2={**DCV2, "prototypes": [10, 12, 8], "batch_size": 64,
                                                             "freeze_prototypes_iters": 2})
    m = build_method(cfg, "deepclusterv2", data)
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    cpu = torch.device("cpu")
    ctx = TrainContext(data=data, device=cpu, seed=0, make_batches=batch_maker(cfg, data, cpu),
                       reset_optimizer_state=lambda ps: [opt.state.pop(p, None) for p in ps])
    plan = m.on_epoch_start(0, ctx)
    # the memory was filled by the first pass: every image, unit rows, one bank per assigned crop
    assert m.memory.shape == (2, 300, 64)
    assert torch.allclose(m.memory.norm(dim=2), torch.ones(2, 300), atol=1e-5)
    assert not torch.allclose(m.memory[0], m.memory[1])  # two different crops
    for h, k in enumerate([10, 12, 8]):  # head h clusters bank h mod 2
        res = spherical_kmeans(m.memory[h % 2], k, 10, torch.Generator().manual_seed(
            derive_seed(0, "deepclusterv2-kmeans", 0, h)))
        assert torch.equal(m.prototypes[h].weight, res.centroids)
        assert torch.equal(m.assignments[h], res.assign)
    assert plan.metrics["empty_clusters"] >= 0 and 0 <= plan.metrics["nmi_labels"] <= 1
    # frozen prototypes: two optimiser steps leave them at the centroids (and without optimiser state)
    cents = [p.weight.detach().clone() for p in m.prototypes]
    batch = next(iter(ctx.augmented_batches(m.view_specs(), seed=1, batch_size=32)))
    for step in range(3):
        m.train()
        out = m(batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        before = m.memory[:, batch.idx].clone()
        m.on_after_step(True)
        moved = [not torch.equal(p.weight, c) for p, c in zip(m.prototypes, cents)]
        assert moved == [step >= 2] * 3
        assert not torch.equal(m.memory[:, batch.idx], before)  # the batch's rows were rewritten
    # the next epoch starts from the memory: prototypes back to (new) centroids
    m.on_epoch_start(1, ctx)
    assert torch.allclose(m.prototypes[0].weight.norm(dim=1), torch.ones(10), atol=1e-6)


def test_deepclusterv2_resume_is_exact(digits, tmp_path):
    cfg = make_cfg(methods=["deepclusterv2"], deepclusterv2={**DCV2, "epochs": 2, "prototypes": [10, 10],
                                                             "freeze_prototypes_iters": 6},
                   log_every=1, checkpoint_minutes=0.0)
    hist = assert_resume_is_exact(cfg, "deepclusterv2", subset(digits), tmp_path, kill_after=1, kill_at_batch=2)
    assert all(0.0 <= h["nmi_labels"] <= 1.0 for h in hist)


def test_deepclusterv2_beats_random_init_on_digits(digits, tmp_path):
    rand, _ = knn_after_pretrain("random", digits, tmp_path)
    acc, hist = knn_after_pretrain("deepclusterv2", digits, tmp_path, deepclusterv2=DCV2)
    assert hist[-1]["loss"] < hist[0]["loss"] and acc > rand + 2.0, (acc, rand)
    assert hist[-1]["nmi_labels"] > hist[0]["nmi_labels"]  # the clusters follow the classes better

"""SwAV and DeepCluster-v2 on two processes (torch.distributed, gloo on the CPU): the distributed
Sinkhorn (queue rows shared out over the ranks) gives the one-process codes of the concatenated batch,
the distributed spherical k-means the one-process k-means of the concatenated memory, and two-rank
training keeps the state the methods' own gathers maintain (SwAV's prototypes and queue,
DeepCluster-v2's memory, targets and prototypes) identical on both ranks. One spawn of two processes
serves every test of this file (module fixture)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_cfg
from distributed import run_ranks
from test_deepclusterv2 import DCV2
from test_swav import SWAV

N_SCORES, K, B = 37, 6, 10  # an odd row count: the ranks hold 19 and 18 rows
N_MEMORY = 301


def scores(n=N_SCORES, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, 8, generator=g), dim=1) @ F.normalize(torch.randn(k, 8, generator=g), dim=1).t()


def memory():
    g = torch.Generator().manual_seed(4)
    centres = 2 * torch.randn(5, 8, generator=g).repeat(61, 1)[:N_MEMORY]  # 5 blobs
    return F.normalize(torch.randn(N_MEMORY, 8, generator=g) + centres, dim=1)


def small_data(folder, n=160):
    from selfsup.data.prepared import Data, Split, load_prepared

    d = load_prepared(folder)
    return Data(Split(d.train.x[:n], d.train.y[:n]), d.test, {**d.meta, "n_train": n})


def swav_cfg():
    return make_cfg(methods=["swav"], swav={**SWAV, "epochs": 2, "batch_size": 16, "prototypes": 20, "feat_dim": 16,
                                            "proj_hidden": 32, "queue_length": 64, "epoch_queue_starts": 0,
                                            "freeze_prototypes_iters": 3}, log_every=1)


def dcv2_cfg():
    return make_cfg(methods=["deepclusterv2"], deepclusterv2={**DCV2, "epochs": 2, "batch_size": 16, "feat_dim": 16,
                                                              "proj_hidden": 32, "prototypes": [10, 12],
                                                              "freeze_prototypes_iters": 3}, log_every=1)


def method_codes(m, full, world, rank):
    """SwAV.codes of this rank's half of a (2 crops, 2B) batch of scores, crop-major."""
    part = full[:, rank * B:(rank + 1) * B] if world > 1 else full
    return m.codes(part.reshape(-1, K), part.shape[1])  # (A, B_r, K)


def queued_method(folder):
    from selfsup.engine.loop import build_method

    # a queue of 14 at batch 7: a multiple of the global batch on one process (7) and on two (14), which
    # the official rounding (SwAV.queue_length) keeps as it is
    cfg = make_cfg(methods=["swav"], swav={**SWAV, "batch_size": 7, "prototypes": K, "feat_dim": 8, "queue_length": 14})
    m = build_method(cfg, "swav", small_data(folder))
    assert m.queue_length == 14
    g = torch.Generator().manual_seed(9)
    m.queue.copy_(F.normalize(torch.randn(2, 14, 8, generator=g), dim=2))  # (A, L, D)
    m._rows = 14  # full: in use
    return m


def _ranks(folder, tmp):
    from selfsup.core import dist
    from selfsup.cluster.spherical_kmeans import spherical_kmeans
    from selfsup.cluster.sinkhorn import swav_sinkhorn
    from selfsup.engine.loop import pretrain

    r, w = dist.rank(), dist.world()
    out = {}
    s = scores()
    out["codes"] = swav_sinkhorn(s[dist.shard(N_SCORES)], 0.05, 3)
    m = queued_method(folder)
    out["method_codes"] = method_codes(m, torch.stack([scores(2 * B, K, 1), scores(2 * B, K, 2)]), w, r)
    x = memory()
    res = spherical_kmeans(x[dist.shard(N_MEMORY)], 9, 10, torch.Generator().manual_seed(5))
    out["kmeans"] = (res.centroids, dist.all_gather_varlen(res.assign), res.counts, res.objective)
    data = small_data(folder)
    for name, cfg in (("swav", swav_cfg()), ("deepclusterv2", dcv2_cfg())):
        m, hist = pretrain(cfg, name, data, Path(tmp) / f"{name}-{r}" / "ck.pt")
        out[name] = {"state": {k: v.clone() for k, v in m.state_dict().items()}, "loss": [h["loss"] for h in hist]}
    return out


@pytest.fixture(scope="module")
def ranks(digits_folder, tmp_path_factory):
    return run_ranks(_ranks, 2, (str(digits_folder), str(tmp_path_factory.mktemp("swav_dist"))))


def test_distributed_sinkhorn_equals_one_process_on_the_concatenated_batch(ranks, digits_folder):
    from selfsup.cluster.sinkhorn import swav_sinkhorn

    one = swav_sinkhorn(scores(), 0.05, 3)
    assert [len(r["codes"]) for r in ranks] == [19, 18]
    assert torch.allclose(torch.cat([r["codes"] for r in ranks]), one, atol=1e-6)
    # the method: each rank puts its share of the queue rows before its half of the batch
    m = queued_method(digits_folder)
    full = method_codes(m, torch.stack([scores(2 * B, K, 1), scores(2 * B, K, 2)]), 1, 0)  # (A, 2B, K)
    both = torch.cat([r["method_codes"] for r in ranks], dim=1)
    assert both.shape == full.shape and torch.allclose(both, full, atol=1e-6)


def test_distributed_kmeans_equals_one_process_on_the_concatenated_memory(ranks):
    from selfsup.cluster.spherical_kmeans import spherical_kmeans

    one = spherical_kmeans(memory(), 9, 10, torch.Generator().manual_seed(5))
    for r in ranks:
        cents, assign, counts, obj = r["kmeans"]
        assert torch.equal(assign, one.assign) and torch.equal(counts, one.counts)
        assert torch.allclose(cents, one.centroids, atol=1e-6) and abs(obj - one.objective) < 1e-6
    assert torch.equal(ranks[0]["kmeans"][0], ranks[1]["kmeans"][0])  # every rank the same centroids


def test_training_keeps_the_ranks_identical(ranks):
    for name in ("swav", "deepclusterv2"):
        s0, s1 = ranks[0][name]["state"], ranks[1][name]["state"]
        assert s0.keys() == s1.keys()
        for k in s0:
            assert torch.equal(s0[k], s1[k]), (name, k)  # parameters and buffers
        assert ranks[0][name]["loss"] == ranks[1][name]["loss"] and len(ranks[0][name]["loss"]) == 2
    sw = ranks[0]["swav"]["state"]
    assert int(sw["queue_rows"]) == 64 and float(sw["queue"].abs().sum()) > 0  # filled with both ranks' rows
    assert torch.allclose(sw["prototypes.weight"].norm(dim=1), torch.ones(20), atol=1e-6)
    dc = ranks[0]["deepclusterv2"]["state"]
    assert (dc["assignments"] >= 0).all() and torch.allclose(dc["memory"].norm(dim=2), torch.ones(2, 160), atol=1e-5)

"""DINO and MoCo v3 on vit_digits under two gloo processes (tests/distributed.py): DINO's teacher and
centre (kept equal only by the method's own EMA and all-reduced centre, DDP broadcasts no buffers) stay
identical on the ranks through a short pretraining; MoCo v3's loss of two ranks with half batches each,
keys gathered from both, is the one-process loss of the concatenated batch (batch norm over the global
batch), and DDP's averaged gradient is the one-process gradient."""
from pathlib import Path

import torch
from conftest import make_cfg
from distributed import run_ranks
from test_dino import SMALL as DINO_SMALL
from test_mocov3 import SMALL as MOCOV3_SMALL
from torch import nn


def small_data(folder, n=160):
    from selfsup.data.prepared import Data, Split, load_prepared

    d = load_prepared(folder)
    return Data(Split(d.train.x[:n], d.train.y[:n]), d.test, {**d.meta, "n_train": n})


# ----------------------------------------------------------------- DINO: teacher and centre in step
def _dino(folder, tmp):
    from selfsup.core import dist
    from selfsup.engine.loop import pretrain

    cfg = make_cfg(methods=["dino"], dino={**DINO_SMALL, "batch_size": 16}, log_every=1)
    m, hist = pretrain(cfg, "dino", small_data(folder), Path(tmp) / f"dino-{dist.rank()}" / "ck.pt")
    return {"state": {k: v.clone() for k, v in m.state_dict().items()}, "loss": [h["loss"] for h in hist],
            "world": dist.world()}


def test_dino_keeps_teacher_and_centre_identical_on_the_ranks(digits_folder, tmp_path):
    r0, r1 = run_ranks(_dino, 2, (str(digits_folder), str(tmp_path)))
    assert r0["world"] == r1["world"] == 2
    s0, s1 = r0["state"], r1["state"]
    assert set(s0) == set(s1)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    assert r0["loss"] == r1["loss"] and len(r0["loss"]) == 2
    assert s0["center"].abs().sum() > 0 and int(s0["teacher.step"]) == 2 * 5  # 160 images / (16 x 2) a step
    assert any(k.startswith("teacher.copies.backbone.") for k in s0)
    assert not torch.equal(s0["teacher.copies.backbone.trunk.vit.encoder.pos_embedding"],
                           s0["backbone.trunk.vit.encoder.pos_embedding"])  # the teacher lags the student


# ----------------------------------------------------------------- MoCo v3: 2 x B/2 == 1 x B
def _mocov3_method(folder):
    from selfsup.core import dist
    from selfsup.engine.loop import build_method

    # a learned position embedding and torchvision's init: with the official sin-cos table (zero at the
    # CLS position) the CLS token (torchvision's zeros, or MoCo v3's std 1e-6) enters the first LayerNorm
    # as a (near-)constant vector, whose gradient amplifies float rounding by up to 1 / sqrt(eps), so a
    # batch split over ranks differs from one process in the CLS token's gradient by more than rounding
    # (the gathers under test are the same either way)
    m = build_method(make_cfg(methods=["mocov3"], mocov3={**MOCOV3_SMALL, "init": "torchvision", "pos_embed": "learned"}),
                     "mocov3", small_data(folder))
    m = dist.sync_batch_norm(m.train(), torch.device("cpu"))  # BN over the global batch (one process: plain BN)
    # the CPU conversion makes new BN parameters, trainable ones: the momentum projector's must stay
    # frozen (else DDP waits for their gradients and leaves their buckets un-averaged)
    for p in [*m.momentum_backbone.parameters(), *m.momentum_projector.parameters()]:
        p.requires_grad_(False)
    return m


def _mocov3_batch(lo, hi):
    from selfsup.methods import Batch

    g = torch.Generator().manual_seed(7)
    x1, x2 = torch.randn(16, 1, 8, 8, generator=g), torch.randn(16, 1, 8, 8, generator=g)
    return Batch([x1[lo:hi], x2[lo:hi]], torch.zeros(hi - lo, dtype=torch.long), torch.arange(lo, hi))


def _mocov3_two_ranks(folder):
    from selfsup.core import dist

    m = _mocov3_method(folder)
    ddp = nn.parallel.DistributedDataParallel(m, forward_sync_buffers=False)
    r = dist.rank()
    loss = ddp(_mocov3_batch(8 * r, 8 * (r + 1))).loss
    loss.backward()
    return {"loss": float(loss.detach()), "grads": {k: p.grad.clone() for k, p in m.named_parameters()
                                                   if p.grad is not None}}


def test_mocov3_two_ranks_give_the_one_process_loss_of_the_whole_batch(digits_folder):
    r0, r1 = run_ranks(_mocov3_two_ranks, 2, (str(digits_folder),))
    m = _mocov3_method(str(digits_folder))
    loss = m(_mocov3_batch(0, 16)).loss
    loss.backward()
    # each rank: the mean over its 8 queries against all 16 keys; their mean is the mean over 16
    assert abs((r0["loss"] + r1["loss"]) / 2 - float(loss.detach())) < 1e-5
    assert r0["loss"] != r1["loss"]
    ref = {k: p.grad for k, p in m.named_parameters() if p.grad is not None}
    assert set(ref) == set(r0["grads"]) and "backbone.trunk.vit.conv_proj.weight" not in ref  # frozen
    for k, g in ref.items():
        torch.testing.assert_close(r0["grads"][k], g, rtol=1e-4, atol=1e-6, msg=lambda s, k=k: f"{k}: {s}")
        assert torch.equal(r0["grads"][k], r1["grads"][k]), k

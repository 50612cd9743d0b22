"""The engine: per-step schedules, optimisers over parameter groups, precision, accumulation,
mid-epoch resume, byte-identical model files, and the method contract."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_resume_is_exact, make_cfg
from selfsup.data.prepared import Data, Split
from selfsup.engine.optim import LARS, build_optimizer, param_groups
from selfsup.engine.schedules import Schedule, lr_schedule
from selfsup.engine.loop import pretrain


def small(digits, n=160):
    return Data(Split(digits.train.x[:n], digits.train.y[:n]), digits.test, {**digits.meta, "n_train": n})


# ----------------------------------------------------------------- schedules
def test_invaspread_official_multistep_learning_rates():
    """demo_seen.py (after its "fix lr bug" commit): lr 0.03, x0.1 from epoch 120, x0.05 from 160,
    x0.01 from 200 (absolute factors of the base lr, not cumulative)."""
    c = make_cfg(methods=["invaspread"], invaspread={"epochs": 301, "lr": 0.03, "lr_schedule": "step",
                                                     "lr_steps": [120, 160, 200], "lr_factors": [0.1, 0.05, 0.01]}
                 ).method("invaspread")
    s = lr_schedule(c, steps_per_epoch=7)

    def official(epoch):  # the official adjust_learning_rate, written out
        if epoch >= 200:
            return 0.03 * 0.01
        if epoch >= 160:
            return 0.03 * 0.05
        if epoch >= 120:
            return 0.03 * 0.1
        return 0.03

    for epoch in (0, 119, 120, 159, 160, 199, 200, 300):
        for b in (0, 6):
            assert s(epoch * 7 + b) == pytest.approx(official(epoch), rel=1e-12), (epoch, b)


def test_step_schedule_without_factors_is_x01_per_milestone():
    s = Schedule("step", 1.0, total_steps=100, steps_per_epoch=10, milestones=(4, 8))
    assert [round(s(e * 10), 12) for e in (0, 3, 4, 7, 8, 9)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]


def test_warmup_then_cosine_per_step_and_per_epoch():
    s = Schedule("cosine", 2.0, total_steps=100, steps_per_epoch=10, warmup_steps=10, final=0.2)
    assert [s(i) for i in (0, 4, 9)] == pytest.approx([0.2, 1.0, 2.0])  # linear ramp from 0 (SimCLR)
    assert s(10) == pytest.approx(2.0) and s(55) == pytest.approx(1.1) and s(100) == pytest.approx(0.2)
    vals = [s(i) for i in range(10, 100)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    # MoCo's per-epoch cosine: lr * 0.5 * (1 + cos(pi * epoch / epochs)), constant within an epoch
    e = Schedule("cosine", 1.0, total_steps=100, steps_per_epoch=10, unit="epoch")
    assert {e(30 + b) for b in range(10)} == {0.5 * (1 + math.cos(math.pi * 3 / 10))}


def test_lr_factors_must_match_the_milestones():
    from selfsup.core.config import ConfigError

    with pytest.raises(ConfigError, match="invaspread.lr_factors"):
        make_cfg(methods=["invaspread"], invaspread={"lr_steps": [120, 160], "lr_factors": [0.1]})


# ----------------------------------------------------------------- optimisers
def lars_reference(w, g, v, lr, m, wd, eta, exclude):
    """SimCLR's LARSOptimizer.apply_gradients for one tensor, written out (no nesterov)."""
    if not exclude:
        g = g + wd * w
        wn, gn = float(np.linalg.norm(w)), float(np.linalg.norm(g))
        trust = eta * wn / gn if wn > 0 and gn > 0 else 1.0
    else:
        trust = 1.0
    v = m * v + lr * trust * g
    return w - v, v


def test_lars_matches_the_official_update():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    groups = param_groups(net, 1e-4, exclude_norm_bias=True)
    assert [len(g["params"]) for g in groups] == [2, 4] and groups[1]["weight_decay"] == 0.0
    opt = LARS(groups, lr=0.5, momentum=0.9, weight_decay=1e-4, eta=0.001)
    ref = {id(p): (p.detach().double().numpy().copy(), np.zeros(p.shape)) for p in net.parameters()}
    excluded = {id(p) for p in groups[1]["params"]}
    for step, lr in enumerate((0.5, 0.25, 0.125)):
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        net(torch.randn(8, 5)).pow(2).mean().backward()
        for p in net.parameters():
            w, v = ref[id(p)]
            ref[id(p)] = lars_reference(w, p.grad.double().numpy(), v, lr, 0.9, 1e-4, 0.001, id(p) in excluded)
        opt.step()
        for p in net.parameters():
            np.testing.assert_allclose(p.detach().double().numpy(), ref[id(p)][0], rtol=1e-5, atol=1e-7)


def test_sgd_and_adamw_take_the_method_groups():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    c = make_cfg(methods=["simclr"], simclr={"optimizer": "adamw", "weight_decay": 0.05, "lr": 1e-3,
                                             "exclude_norm_bias": True}).method("simclr")
    opt = build_optimizer(param_groups(net, c.weight_decay, c.exclude_norm_bias), c)
    assert isinstance(opt, torch.optim.AdamW)
    wd = {p.ndim: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd == {4: 0.05, 1: 0.0}


# ----------------------------------------------------------------- the loop
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_a_cpu(digits, tmp_path, precision):
    """Both autocast paths (fp16 with its GradScaler) run and learn; the preset smokes run in fp32."""
    cfg = make_cfg(precision=precision, supervised={"epochs": 3})
    _, hist = pretrain(cfg, "supervised", small(digits, 400), tmp_path / "s.pt")
    assert np.isfinite([h["loss"] for h in hist]).all() and hist[-1]["loss"] < 0.8 * hist[0]["loss"]


def test_accumulation_steps_the_optimiser_every_k_batches(digits, tmp_path):
    data = small(digits, 160)  # 5 batches of 32 per epoch
    steps = {}
    for acc in (1, 2):
        cfg = make_cfg(supervised={"epochs": 2, "batch_size": 32, "accumulate": acc, "clip_grad": 1.0})
        pretrain(cfg, "supervised", data, tmp_path / f"a{acc}.pt")
        steps[acc] = torch.load(tmp_path / f"a{acc}.pt", weights_only=False)["step"]
    assert steps == {1: 10, 2: 6}  # ceil(5 / 2) = 3 optimiser steps per epoch


def test_deepcluster_resumes_mid_epoch_exactly(digits, tmp_path):
    cfg = make_cfg(log_every=1, checkpoint_minutes=0.0, deepcluster={"epochs": 2, "k": 20, "pca_dim": 16})
    # killed after batch 3 of epoch 2: the epoch's plan (clusters, order, new head) is restored,
    # not recomputed from the half-trained backbone
    assert_resume_is_exact(cfg, "deepcluster", small(digits, 200), tmp_path, kill_after=1, kill_at_batch=3)


def test_the_model_file_is_byte_reproducible(digits, tmp_path):
    from selfsup.engine.loop import save_backbone

    cfg = make_cfg()
    m, _ = pretrain(cfg, "random", digits, tmp_path / "r.pt")
    save_backbone(tmp_path / "a.pt", m, cfg, digits.meta)
    save_backbone(tmp_path / "b.pt", m, cfg, digits.meta)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_forward_is_what_the_loop_calls(digits, tmp_path, monkeypatch):
    """The loop calls the module (so a DDP wrapper's hooks fire), not a side method."""
    from selfsup.methods import REGISTRY

    calls = []
    cls = REGISTRY["supervised"]
    monkeypatch.setattr(cls, "__call__", lambda self, *a, **k: calls.append(1) or nn.Module.__call__(self, *a, **k))
    pretrain(make_cfg(supervised={"epochs": 1}), "supervised", small(digits, 96), tmp_path / "s.pt")
    assert len(calls) == 2  # 96 images, batch 64: two batches

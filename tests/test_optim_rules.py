"""Shared optimiser pieces: Caffe's bias lr_mult, apex LARC (SwAV / SimSiam), the linspace warm-up."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from selfsup.engine.optim import LARS, param_groups
from selfsup.engine.schedules import Schedule


def test_bias_lr_mult_puts_conv_and_linear_biases_in_their_own_group():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    groups = param_groups(net, 5e-4, exclude_norm_bias=False, bias_lr_mult=2.0)
    biases = {id(net[0].bias), id(net[3].bias)}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        if g.get("lr_scale", 1.0) == 2.0:
            assert ids == biases
        else:
            assert not ids & biases
        assert g["weight_decay"] == 5e-4
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    # 1.0: the old two-way split, no lr_scale
    assert all("lr_scale" not in g for g in param_groups(net, 5e-4, False))


def _larc_reference(params, grads, lr, wd, eta, momentum, bufs):
    """apex LARC(clip=False) + torch SGD, one tensor at a time, written from apex/parallel/LARC.py."""
    out = []
    for i, (w, g) in enumerate(zip(params, grads)):
        w, g = w.clone(), g.clone()
        pn, gn = float(w.norm()), float(g.norm())
        if pn != 0 and gn != 0:
            a = eta * pn / (gn + pn * wd + 1e-8)
            g = (g + wd * w) * a
        bufs[i] = g.clone() if bufs[i] is None else momentum * bufs[i] + g
        out.append(w - lr * bufs[i])
    return out


def test_larc_matches_apex_larc_around_sgd():
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.zeros(4)), nn.Parameter(torch.randn(7))]
    opt = LARS([{"params": ps}], lr=0.3, momentum=0.9, weight_decay=1e-6, eta=0.001, rule="larc")
    ref_w = [p.detach().clone() for p in ps]
    bufs = [None] * len(ps)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ps]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        ref_w = _larc_reference(ref_w, grads, 0.3, 1e-6, 0.001, 0.9, bufs)
        for p, r in zip(ps, ref_w):
            torch.testing.assert_close(p.detach(), r, rtol=1e-6, atol=1e-7)
    # the zero tensor kept its raw gradient: it moved by exactly lr x momentum-summed gradients
    assert ps[1].abs().sum() > 0


def test_larc_differs_from_simclr_lars():
    torch.manual_seed(1)
    w0 = torch.randn(6, 4)
    res = []
    for rule in ("simclr", "larc"):
        p = nn.Parameter(w0.clone())
        p.grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
        LARS([p], lr=1.0, weight_decay=0.1, eta=0.01, rule=rule).step()
        res.append(p.detach())
    assert not torch.allclose(res[0], res[1])


def test_warmup_from_a_start_value_is_numpy_linspace():
    s = Schedule(kind="cosine", base=4.8, total_steps=100, steps_per_epoch=10, warmup_steps=20,
                 warmup_start=0.3, final=0.0048)
    np.testing.assert_allclose([s(i) for i in range(20)], np.linspace(0.3, 4.8, 20), rtol=1e-12)
    assert s(20) == 4.8
    # no start value: the old ramp, lr x (step + 1) / warmup
    s0 = Schedule(kind="constant", base=1.0, total_steps=10, steps_per_epoch=10, warmup_steps=4)
    assert [s0(i) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]

"""BYOL and SimSiam (issue 14): the losses against slow references written from the papers'
pseudocode, BYOL's cosine target-decay schedule, no gradient into the target / stop-gradient side,
an exact resume of BYOL after a kill (target and step counter included), and a few epochs on
digits beating the random-init encoder. Two gloo processes keeping BYOL's target and SimSiam's state
identical: tests/test_distributed.py (every method's whole state, buffers included)."""
import math

import torch

from conftest import assert_resume_is_exact, knn_after_pretrain, make_cfg
from selfsup.contrastive import byol_loss, simsiam_loss
from selfsup.methods.base import Batch
from selfsup.momentum import cosine_momentum
from selfsup.train import build_method

# the digits defaults of params.yaml
AUG = {"augment": "crop", "crop_scale": [0.3, 1.0], "jitter": [0.4, 0.4, 0.4, 0.1], "jitter_p": 0.8,
       "grayscale_p": 0.0, "blur_p": 0.0, "lr_schedule": "cosine", "batch_size": 128, "momentum": 0.9,
       "weight_decay": 5e-4, "epochs": 10}
BYOL = {**AUG, "lr": 0.02, "blur_p2": 0.0, "solarize_p2": 0.0, "proj_dim": 64, "proj_hidden": 256,
        "pred_hidden": 256, "tau": 0.99}
SIMSIAM = {**AUG, "lr": 0.05, "dim": 128, "proj_layers": 2, "pred_hidden": 32}


def test_losses_match_the_papers_pseudocode():
    torch.manual_seed(0)
    q, z = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    # BYOL eq. 2: || q / ||q|| - z / ||z|| ||^2, averaged over the batch
    qd, zd = q.detach(), z.detach()
    ref = sum(float(((qd[i] / qd[i].norm() - zd[i] / zd[i].norm()) ** 2).sum()) for i in range(5)) / 5
    loss = byol_loss(q, z)
    assert abs(float(loss.detach()) - ref) < 1e-5
    loss.backward()
    assert z.grad is None and q.grad is not None  # the target side is a constant
    # SimSiam Algorithm 1: D(p, z) = -(normalize(p) * normalize(z.detach())).sum(dim=1).mean()
    p, z = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    pd, zd = p.detach(), z.detach()
    ref = -sum(float((pd[i] / pd[i].norm() * zd[i] / zd[i].norm()).sum()) for i in range(5)) / 5
    loss = simsiam_loss(p, z)
    assert abs(float(loss.detach()) - ref) < 1e-5
    loss.backward()
    assert z.grad is None and p.grad is not None  # stop-gradient


def test_byol_decay_schedule():
    assert cosine_momentum(0.996, 0, 100) == 0.996
    assert abs(cosine_momentum(0.996, 50, 100) - 0.998) < 1e-12  # half-way: 1 - 0.004 / 2
    assert cosine_momentum(0.996, 100, 100) == 1.0
    ks = [cosine_momentum(0.99, k, 40) for k in range(41)]
    assert all(a <= b for a, b in zip(ks, ks[1:]))
    for k in (7, 23):
        assert abs(ks[k] - (1 - 0.01 * (math.cos(math.pi * k / 40) + 1) / 2)) < 1e-12


def test_byol_target_gets_no_gradient_and_follows_the_online_network(digits):
    m = build_method(make_cfg(methods=["byol"], byol=BYOL), "byol", digits)
    m.total_steps = 10
    x1, x2 = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8)
    out = m(Batch([x1, x2], torch.zeros(8, dtype=torch.long), torch.arange(8)))
    out.loss.backward()
    target = [*m.target_backbone.parameters(), *m.target_projector.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in target)
    assert all(p.grad is not None for p in m.predictor.parameters())
    # after a step, target <- tau target + (1 - tau) online, with tau at step 0
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.target_backbone.parameters()]
    m.on_after_step(stepped=True)
    tau = cosine_momentum(0.99, 0, 10)
    for b, t, o in zip(before, m.target_backbone.parameters(), m.backbone.parameters()):
        assert torch.allclose(t, tau * b + (1 - tau) * o, atol=1e-6)
    assert int(m.ema_step) == 1


def test_byol_resume_is_exact(digits, tmp_path):
    cfg = make_cfg(methods=["byol"], byol={**BYOL, "epochs": 2, "batch_size": 256}, log_every=1,
                   checkpoint_minutes=0.0)
    assert_resume_is_exact(cfg, "byol", digits, tmp_path, kill_after=1, kill_at_batch=2)


def test_byol_and_simsiam_beat_random_init_on_digits(digits, tmp_path):
    rand, _ = knn_after_pretrain("random", digits, tmp_path)
    byol, hist = knn_after_pretrain("byol", digits, tmp_path, byol=BYOL)
    assert hist[-1]["loss"] < hist[0]["loss"] and byol > rand + 2.0, (byol, rand)
    sim, hist = knn_after_pretrain("simsiam", digits, tmp_path, simsiam=SIMSIAM)
    assert hist[-1]["loss"] < hist[0]["loss"] and sim > rand + 2.0, (sim, rand)

"""BYOL and SimSiam (issue 14): the losses against slow references written from the papers'
pseudocode, BYOL's cosine target-decay schedule, no gradient into the target / stop-gradient side,
an exact resume of BYOL after a kill (target and step counter included), and a few epochs on
digits beating the random-init encoder. Two gloo processes keeping BYOL's target and SimSiam's state
identical: tests/test_distributed.py (every method's whole state, buffers included)."""
import math

import torch

from conftest import assert_resume_is_exact, knn_after_pretrain, make_cfg
from selfsup.losses.contrastive import byol_loss, simsiam_loss
from selfsup.engine.contract import Batch
from selfsup.models.momentum import cosine_momentum
from selfsup.engine.loop import build_method

# the digits defaults of params.yaml
AUG = {"augment": "crop", "crop_scale": [0.3, 1.0], "jitter": [0.4, 0.4, 0.4, 0.1], "jitter_p": 0.8,
       "grayscale_p": 0.0, "blur_p": 0.0, "lr_schedule": "cosine", "batch_size": 128, "momentum": 0.9,
       "weight_decay": 5e-4, "epochs": 10}
# the digits default's BYOL block (presets/digits.yaml), heads included: head_bias last there, since with the
# official heads (first) BYOL does not beat random init on digits in these epochs
BYOL = {**AUG, "lr": 0.02, "blur_p2": 0.0, "solarize_p2": 0.0, "proj_dim": 64, "proj_hidden": 256,
        "pred_hidden": 256, "tau": 0.99, "head_bias": "last"}
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
    m.target.total_steps = 10
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
    assert int(m.target.step) == 1


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


def _residual_last_bns(net):
    """The last BN of every torchvision residual block of ``net`` (BasicBlock.bn2, Bottleneck.bn3)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return [m.bn3 if isinstance(m, Bottleneck) else m.bn2 for m in net.modules()
            if isinstance(m, (BasicBlock, Bottleneck))]


def test_simsiam_zero_inits_the_last_bn_of_each_residual_block(digits):
    """Official main_simsiam.py builds its ResNet with zero_init_residual=True: every residual block's last
    BN weight starts at 0 (the other BNs at 1); with the key off, torchvision's default 1 everywhere."""
    for arch, blocks in (("resnet18_cifar", 8), ("resnet50_cifar", 16)):
        cfg = make_cfg(methods=["simsiam"], simsiam={**SIMSIAM, "dim": 16, "pred_hidden": 8}, model={"backbone": arch})
        m = build_method(cfg, "simsiam", digits)
        assert m.cfg.zero_init_residual is True  # the default is the official setting
        last = _residual_last_bns(m.backbone)
        assert len(last) == blocks and all(torch.all(bn.weight == 0) for bn in last), arch
        others = [bn for bn in m.backbone.modules() if isinstance(bn, torch.nn.BatchNorm2d)
                  and all(bn is not b for b in last)]
        assert others and all(torch.all(bn.weight == 1) for bn in others), arch  # only the blocks' last BN
        off = build_method(make_cfg(methods=["simsiam"], simsiam={**SIMSIAM, "dim": 16, "pred_hidden": 8,
                                                                  "zero_init_residual": False},
                                    model={"backbone": arch}), "simsiam", digits)
        assert all(torch.all(bn.weight == 1) for bn in _residual_last_bns(off.backbone)), arch
        # the same seeded weights otherwise (the zero init draws no random numbers)
        on_state, off_state = m.backbone.state_dict(), off.backbone.state_dict()
        changed = {k for k in on_state if not torch.equal(on_state[k], off_state[k])}
        assert changed and all(k.endswith(("bn2.weight", "bn3.weight")) for k in changed), arch


def test_simsiam_zero_init_leaves_a_net_without_residual_blocks_as_built(digits):
    on = build_method(make_cfg(methods=["simsiam"], simsiam=SIMSIAM), "simsiam", digits)
    off = build_method(make_cfg(methods=["simsiam"], simsiam={**SIMSIAM, "zero_init_residual": False}), "simsiam",
                       digits)
    assert on.cfg.zero_init_residual and not _residual_last_bns(on.backbone)
    a, b = on.backbone.state_dict(), off.backbone.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_byol_heads_have_the_official_mlp_biases(digits):
    """deepmind-research byol/utils/networks.py MLP: hk.Linear(hidden, with_bias=True) -> BN -> ReLU ->
    hk.Linear(out, with_bias=False), for both the projector and the predictor (head_bias first, the
    default); head_bias last keeps selfsup.models.heads.projection_head's layout (no bias before the BN, a bias
    on the output Linear)."""
    official = {k: v for k, v in BYOL.items() if k != "head_bias"}  # the typed default
    m = build_method(make_cfg(methods=["byol"], byol=official), "byol", digits)
    assert m.cfg.head_bias == "first"
    d = m.backbone.out_dim
    shapes = {k: tuple(v.shape) for k, v in m.named_parameters() if k.startswith(("projector.", "predictor."))}
    assert shapes == {"projector.0.weight": (256, d), "projector.0.bias": (256,),
                      "projector.1.weight": (256,), "projector.1.bias": (256,),  # the BN
                      "projector.3.weight": (64, 256),
                      "predictor.0.weight": (256, 64), "predictor.0.bias": (256,),
                      "predictor.1.weight": (256,), "predictor.1.bias": (256,),
                      "predictor.3.weight": (64, 256)}
    # the target is a copy of the online projector, biases included
    assert {k for k, _ in m.target_projector.named_parameters()} == {k[len("projector."):] for k in shapes
                                                                     if k.startswith("projector.")}
    last = build_method(make_cfg(methods=["byol"], byol={**BYOL, "head_bias": "last"}), "byol", digits)
    names = {k for k, _ in last.named_parameters() if k.startswith(("projector.", "predictor."))}
    assert "projector.0.bias" not in names and "predictor.0.bias" not in names
    assert tuple(last.projector[3].bias.shape) == (64,) and tuple(last.predictor[3].bias.shape) == (64,)


def test_byol_head_bias_is_checked(digits):
    import pytest

    from selfsup.core.config import ConfigError

    with pytest.raises(ConfigError, match="byol.head_bias"):
        make_cfg(methods=["byol"], byol={**BYOL, "head_bias": "both"})


def test_momentum_target_follows_by_ema_and_keeps_the_online_modules_its_owners():
    """selfsup.models.momentum.MomentumTarget (BYOL, MoCo v3, DINO): copies start equal, are frozen and not
    submodules' duplicates; update() moves them by m x target + (1 - m) x online at the cosine's value."""
    import math

    from torch import nn

    from selfsup.models.momentum import MomentumTarget

    torch.manual_seed(0)
    owner = nn.Module()
    owner.a, owner.b = nn.Linear(3, 4), nn.Linear(4, 2)
    owner.t = MomentumTarget({"a": owner.a, "b": owner.b}, 0.9, "cosine", offset=1)
    owner.t.total_steps = 4
    assert [n for n, p in owner.named_parameters() if p.requires_grad] == ["a.weight", "a.bias", "b.weight", "b.bias"]
    assert all(not p.requires_grad for p in owner.t.parameters())
    assert torch.equal(owner.t["a"].weight, owner.a.weight)
    before = owner.t["b"].weight.clone()
    with torch.no_grad():
        owner.b.weight.add_(1.0)
    m = 1 - (1 - 0.9) * (math.cos(math.pi * 1 / 4) + 1) / 2  # step 0 + offset 1 of 4
    assert owner.t.momentum() == m
    owner.t.update()
    torch.testing.assert_close(owner.t["b"].weight, m * before + (1 - m) * owner.b.weight)
    assert int(owner.t.step) == 1 and "t.step" in owner.state_dict()
    assert MomentumTarget({"a": owner.a}, 0.99, "constant").momentum() == 0.99

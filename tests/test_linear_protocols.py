"""The papers' linear probes of ViTs (selfsup/eval/vit_linear.py, linear.protocol mae | dino | beit) against
references written from the official code: MAE's BN(affine=False) + LARS probe step by step (main_linprobe.py,
util/lars.py, util/lr_sched.py), DINO's last-blocks CLS concatenation (eval_linear.py +
get_intermediate_layers), BEiT's per-block [CLS, mean patch] features (run_linear_eval.py), the cosine
schedules; short runs on digits, the evaluate stage's wiring and the bad keys."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_cfg
from selfsup.core.config import ConfigError
from selfsup.eval.vit_linear import (feature_dims, lr_at, make_heads, make_optimizer, paper_linear_probe,
                                  probe_features, schedule_time, train_step)
from selfsup.models.backbones import Backbone, ViT, build_backbone

CPU = torch.device("cpu")


def test_mae_probe_matches_a_plain_reference_step_by_step():
    """BatchNorm1d(affine=False, eps 1e-6) + Linear trained by MAE's LARS (momentum on the unscaled step,
    the lr outside it; trust ratio and weight decay on the weight only) under MAE's per-step warm-up and
    cosine: the weights after every step and the BN running statistics equal a hand-written loop."""
    g = torch.Generator().manual_seed(0)
    n, d, k, bs, epochs, warm, base, wd = 12, 6, 3, 4, 3, 1, 0.5, 0.01
    x = 0.01 * torch.randn(n, d, generator=g) + 0.02  # a small variance: eps 1e-6 vs 1e-5 shows
    y = torch.arange(n) % k
    heads = make_heads("mae", [d], k, torch.Generator().manual_seed(1))
    opt = make_optimizer("mae", heads.parameters(), base, wd)
    w, b = heads[0][1].weight.detach().clone(), heads[0][1].bias.detach().clone()
    mu_w, mu_b = torch.zeros_like(w), torch.zeros_like(b)
    run_mean, run_var = torch.zeros(d), torch.ones(d)
    steps = n // bs
    for ep in range(epochs):
        for i in range(steps):
            xb, yb = x[i * bs:(i + 1) * bs], y[i * bs:(i + 1) * bs]
            heads.train()
            train_step(heads, opt, [xb], yb, lr_at(base, epochs, warm, schedule_time("mae", ep, i, steps)))
            # the reference: MAE's adjust_learning_rate at epoch + i / steps, min_lr 0
            t = ep + i / steps
            lr = base * t / warm if t < warm else base * 0.5 * (1 + math.cos(math.pi * (t - warm) / (epochs - warm)))
            m, v = xb.mean(0), xb.var(0, unbiased=False)
            xn = (xb - m) / torch.sqrt(v + 1e-6)  # (bs, d)
            run_mean, run_var = 0.9 * run_mean + 0.1 * m, 0.9 * run_var + 0.1 * xb.var(0, unbiased=True)
            p = torch.softmax(xn @ w.T + b, 1)
            dlogits = (p - nn.functional.one_hot(yb, k).float()) / bs  # d mean CE / d logits
            gw, gb = dlogits.T @ xn, dlogits.sum(0)
            dw = gw + wd * w
            dw = dw * (0.001 * w.norm() / dw.norm())
            mu_w, mu_b = 0.9 * mu_w + dw, 0.9 * mu_b + gb
            w, b = w - lr * mu_w, b - lr * mu_b
            torch.testing.assert_close(heads[0][1].weight.detach(), w, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(heads[0][1].bias.detach(), b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(heads[0][0].running_mean, run_mean)
    torch.testing.assert_close(heads[0][0].running_var, run_var)
    assert heads[0][0].weight is None  # affine=False


def _vit(depth=5):
    torch.manual_seed(0)
    return Backbone(ViT(1, 2, 16, depth, 2, 32, 8), 16, None, False, name="vit_test", image_size=8).eval()


def _blocks_by_hand(bb, x):
    """Each block's output (B, 1 + h w, D) from torchvision's modules, written out."""
    vit = bb.trunk.vit
    t = vit.conv_proj(x).flatten(2).transpose(1, 2)
    t = torch.cat([vit.class_token.expand(len(x), -1, -1), t], 1) + vit.encoder.pos_embedding
    out = []
    for layer in vit.encoder.layers:
        t = layer(t)
        out.append(t)
    return out, vit.encoder.ln


def test_dino_last_blocks_cls_concatenation_equals_a_hand_loop():
    """dino: the CLS tokens of the last 4 blocks, each through the final norm, concatenated (ViT-S);
    1 block + the mean of its normed patch tokens (ViT-B); beit: [CLS, mean patch] of every block's
    output, no final norm; mae: the backbone's CLS token."""
    bb, x = _vit(), torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        blocks, ln = _blocks_by_hand(bb, x)
        four = make_cfg(linear={"protocol": "dino", "n_last_blocks": 4}).linear
        (f,) = probe_features(bb, x, four)
        torch.testing.assert_close(f, torch.cat([ln(blocks[i])[:, 0] for i in (1, 2, 3, 4)], 1))
        assert feature_dims(bb, four) == [64] and f.shape == (3, 64)
        vitb = make_cfg(linear={"protocol": "dino", "avgpool_patchtokens": True}).linear
        (f,) = probe_features(bb, x, vitb)
        torch.testing.assert_close(f, torch.cat([ln(blocks[4])[:, 0], ln(blocks[4])[:, 1:].mean(1)], 1))
        beit = make_cfg(linear={"protocol": "beit"}).linear
        fs = probe_features(bb, x, beit)
        assert len(fs) == 5 and feature_dims(bb, beit) == [32] * 5
        for f, t in zip(fs, blocks):
            torch.testing.assert_close(f, torch.cat([t[:, 0], t[:, 1:].mean(1)], 1))
        (f,) = probe_features(bb, x, make_cfg(linear={"protocol": "mae"}).linear)
        torch.testing.assert_close(f, ln(blocks[-1])[:, 0])
    with pytest.raises(ConfigError, match="linear.n_last_blocks: 6 blocks asked, the ViT has 5"):
        feature_dims(bb, make_cfg(linear={"protocol": "dino", "n_last_blocks": 6}).linear)


def test_per_epoch_cosine_is_torchs_cosine_annealing():
    """DINO / BEiT: CosineAnnealingLR(T_max=epochs, eta_min=0) stepped per epoch; MAE reads the schedule
    every step (fractional epochs) and warms up linearly from 0."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10, eta_min=0)
    for ep in range(10):
        for i in range(3):
            assert lr_at(0.3, 10, 0, schedule_time("dino", ep, i, 3)) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert schedule_time("mae", 2, 1, 4) == 2.25 and lr_at(1.0, 90, 10, 2.5) == pytest.approx(0.25)
    assert lr_at(1.0, 90, 10, 10) == pytest.approx(1.0) and lr_at(1.0, 90, 10, 90) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("protocol,over", [("mae", {"lr": 0.1, "lr_scaling": "linear", "warmup_epochs": 1}),
                                           ("dino", {"lr": 0.1, "n_last_blocks": 2, "avgpool_patchtokens": True}),
                                           ("beit", {"lr": 2e-2})])
def test_paper_protocols_train_on_digits(digits, protocol, over):
    """A short run of each protocol on a random vit_digits (512 training images): the encoder untouched;
    dino and beit above chance (10 %; MAE's LARS moves a probe too little in a few dozen steps to test
    that), beit's per-block results."""
    from selfsup.data.prepared import Data, Split

    small = Data(Split(np.asarray(digits.train.x[:512]), digits.train.y[:512]), digits.test, digits.meta)
    torch.manual_seed(0)
    bb = build_backbone("vit_digits", 1, image_size=8).eval()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    cfg = make_cfg(linear={"protocol": protocol, "epochs": 3, "batch_size": 32, "weight_decay": 0.0,
                           "crop_scale": [0.5, 1.0], "flip": False, **over})
    out = paper_linear_probe(bb, small, cfg, CPU, seed=0)
    assert math.isfinite(out["final_loss"]) and out["protocol"].startswith(protocol) and 0 <= out["top1"] <= 100
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())
    if protocol != "mae":
        assert out["top1"] > 15
    if protocol == "beit":
        assert list(out["blocks"]) == ["block1", "block2"] and out["top1"] == max(out["blocks"].values())
        assert out["best_block"] in out["blocks"]
    else:
        assert "blocks" not in out


def test_conv_nets_fall_back_to_the_pooled_output_and_the_stage_wires_it(digits, digits_folder, tmp_path):
    """A conv net under dino: the backbone's output (DINO's eval_linear.py on a ResNet), through the
    evaluate stage's linear step; mae refuses a batch above the training set (drop_last)."""
    from selfsup.eval.evaluate_all import linear_step
    from selfsup.models.backbones import save_backbone
    from selfsup.core.stage import Paths
    from selfsup.engine.loop import build_method

    P = Paths(tmp_path)
    P.dataset.parent.mkdir(parents=True, exist_ok=True)
    P.dataset.symlink_to(digits_folder)
    cfg = make_cfg(methods=["random"], linear={"protocol": "dino", "epochs": 1, "batch_size": 128, "lr": 2.0,
                                               "weight_decay": 0.0, "crop_scale": [0.5, 1.0], "flip": False},
                   svm={"enabled": False})
    save_backbone(P.model("random"), build_method(cfg, "random", digits), cfg, digits.meta)
    tr = np.zeros((len(digits.train.y), 4), np.float32)
    out = linear_step(cfg, "random", P, tr, digits.train.y, tr[:len(digits.test.y)], digits.test.y, 10, CPU)
    assert "conv net: the backbone output" in out["protocol"] and 0 <= out["top1"] <= 100  # random init: no bar
    assert "svm_top1" not in out and "probes" not in out
    big = make_cfg(linear={"protocol": "mae", "batch_size": 4096})
    with pytest.raises(ConfigError, match="linear.batch_size"):
        paper_linear_probe(build_backbone("smallcnn", 1), digits, big, CPU, seed=0)


@pytest.mark.parametrize("over,match", [
    ({"protocol": "simclr"}, "linear.protocol"), ({"protocol": "mae", "n_last_blocks": 4}, "linear.n_last_blocks"),
    ({"protocol": "beit", "avgpool_patchtokens": True}, "linear.avgpool_patchtokens"),
    ({"warmup_epochs": 5}, "linear.warmup_epochs: the frozen protocol"), ({"lr_scaling": "sqrt"}, "linear.lr_scaling"),
    ({"protocol": "mae", "warmup_epochs": 100}, "linear.warmup_epochs: 100 must be below"),
    ({"lr_schedule": "cosine"}, "linear.lr_schedule: only the augmented"),
    ({"protocol": "augmented", "lr_schedule": "linear"}, "linear.lr_schedule"),
    ({"protocol": "augmented", "lr_schedule": "cosine", "lr_steps": [60]}, "linear.lr_steps"),
    ({"protocol": "augmented", "optimizer": "adamw"}, "linear.optimizer"),
    ({"protocol": "augmented", "optimizer": "lars", "nesterov": True}, "linear.nesterov"),
    ({"nesterov": True}, "linear.nesterov: only the augmented")])
def test_bad_linear_keys_are_named(over, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(linear=over)


def test_augmented_protocol_schedules_and_optimisers():
    """linear.protocol augmented (selfsup/eval/augmented_linear.py): step = MoCo's x0.1 per milestone; cosine = MoCo v3's /
    SimSiam's adjust_learning_rate, init_lr x 0.5 (1 + cos(pi epoch / epochs)), and SwAV's
    CosineAnnealingLR(epochs, eta_min 0) stepped per epoch; nesterov (BYOL) on the SGD; lars = apex LARC
    (trust 0.001, clip False) around it, as SimSiam's --lars."""
    from selfsup.eval.augmented_linear import lincls_lr, lincls_optimizer
    from selfsup.engine.optim import LARS

    step = make_cfg(linear={"protocol": "augmented", "epochs": 100, "lr_steps": [60, 80]}).linear
    assert [lincls_lr(step, 30.0, e) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([30, 30, 3, 3, 0.3, 0.3])
    cos = make_cfg(linear={"protocol": "augmented", "epochs": 90, "lr_schedule": "cosine"}).linear
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.6)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 90, eta_min=0)
    for e in range(90):
        want = 1.6 * 0.5 * (1.0 + math.cos(math.pi * e / 90))
        assert lincls_lr(cos, 1.6, e) == pytest.approx(want, rel=1e-12) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    w = [nn.Parameter(torch.ones(3, 2))]
    sgd = lincls_optimizer(w, make_cfg(linear={"protocol": "augmented", "nesterov": True}).linear, 0.1)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    lars = lincls_optimizer(w, make_cfg(linear={"protocol": "augmented", "optimizer": "lars",
                                                "weight_decay": 0.0}).linear, 0.1)
    assert isinstance(lars, LARS) and lars.defaults["rule"] == "larc" and lars.defaults["eta"] == 0.001
    assert not lars.param_groups[0]["lars_exclude"]  # the weight and the bias alike (LARC wraps every group)

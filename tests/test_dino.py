"""DINO: the loss against a slow reference written from the paper's Algorithm 1 (extended to multi-crop as
sec. 3.1 describes), the centre update, the teacher-temperature schedule (the official np.linspace),
the head, no gradient into the teacher and its EMA, the frozen last layer of the first epoch(s), an exact
resume after a kill (teacher, centre, step counter and epoch included), and a short run on digits with
vit_digits beating the random-init vit_digits. Two gloo processes: tests/test_vit_dist.py."""
import math

import numpy as np
import torch
import torch.nn.functional as F
from conftest import assert_resume_is_exact, make_cfg

from selfsup.engine.contract import Batch
from selfsup.losses.dino import batch_centre, dino_loss, teacher_temperature, update_centre
from selfsup.models.momentum import cosine_momentum
from selfsup.engine.loop import build_method

# the digits defaults proposed for params.yaml (dino block)
DIGITS = {"backbone": "vit_digits", "epochs": 10, "batch_size": 128, "optimizer": "adamw", "lr": 0.002,
          "lr_scaling": "none", "lr_schedule": "cosine", "min_lr": 1e-6, "warmup_epochs": 1, "weight_decay": 0.04,
          "exclude_norm_bias": True, "clip_grad": 3.0, "augment": "crop", "crop_scale": [0.6, 1.0],
          "jitter": [0.4, 0.4, 0.4, 0.1], "jitter_p": 0.8, "grayscale_p": 0.0, "blur_p": 0.0, "blur_p2": 0.0,
          "solarize_p2": 0.0, "global_size": 0, "local_crops": 2, "local_size": 4, "local_scale": [0.2, 0.5],
          "local_blur_p": 0.0, "out_dim": 512, "hidden_dim": 256, "bottleneck_dim": 64, "head_layers": 3,
          "head_bn": True, "norm_last_layer": True, "freeze_last_layer": 1, "momentum_teacher": 0.95,
          "student_temp": 0.1, "teacher_temp": 0.04, "warmup_teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0,
          "center_momentum": 0.9}
SMALL = {**DIGITS, "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "epochs": 2, "warmup_epochs": 0}


def _h(t, s, c, tps, tpt):
    """Algorithm 1's H(t, s) for one sample: t centred and sharpened, s sharpened, cross-entropy."""
    pt = torch.softmax((t - c) / tpt, dim=0)
    ps = torch.softmax(s / tps, dim=0)
    return float(-(pt * torch.log(ps)).sum())


def test_loss_matches_algorithm_1():
    torch.manual_seed(0)
    b, k, tps, tpt = 5, 7, 0.1, 0.04
    c = torch.randn(1, k)
    # two views only: Algorithm 1, loss = H(t1, s2) / 2 + H(t2, s1) / 2, each H a batch mean
    s1, s2, t1, t2 = (torch.randn(b, k) for _ in range(4))
    ref = sum(_h(t1[i], s2[i], c[0], tps, tpt) / 2 + _h(t2[i], s1[i], c[0], tps, tpt) / 2 for i in range(b)) / b
    got = dino_loss(torch.cat([s1, s2]), torch.cat([t1, t2]), c, tps, tpt)
    assert abs(float(got) - ref) < 1e-5
    # multi-crop (sec. 3.1): every (teacher global i, student view v != i) pair, averaged over the pairs
    locs = [torch.randn(b, k) for _ in range(3)]
    views = [s1, s2, *locs]
    ts = [t1, t2]
    pairs = [(i, v) for i in range(2) for v in range(len(views)) if v != i]
    ref = sum(_h(ts[i][n], views[v][n], c[0], tps, tpt) for i, v in pairs for n in range(b)) / (b * len(pairs))
    got = dino_loss(torch.cat(views), torch.cat(ts), c, tps, tpt)
    assert len(pairs) == 8 and abs(float(got) - ref) < 1e-5
    # the teacher side is a constant
    s = torch.cat(views).requires_grad_()
    t = torch.cat(ts).requires_grad_()
    dino_loss(s, t, c, tps, tpt).backward()
    assert t.grad is None and s.grad is not None


def test_centre_update():
    t = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [2.0, 5.0, 0.0], [0.0, 3.0, 4.0]])
    mean = batch_centre(t)
    assert torch.allclose(mean, torch.tensor([[1.5, 3.0, 2.0]]))
    c = torch.tensor([[1.0, -1.0, 0.5]])
    assert torch.allclose(update_centre(c, mean, 0.9), torch.tensor([[0.9 + 0.15, -0.9 + 0.3, 0.45 + 0.2]]))


def test_teacher_temperature_schedule():
    # the official schedule: np.linspace(warmup, temp, W) for the first W epochs, then temp
    official = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))
    got = [teacher_temperature(e, 0.04, 0.07, 30) for e in range(100)]
    assert np.allclose(got, official, rtol=0, atol=1e-12)
    assert got[0] == 0.04 and got[29] == 0.07 and abs(got[15] - (0.04 + 0.03 * 15 / 29)) < 1e-12
    assert [teacher_temperature(e, 0.04, 0.07, 0) for e in range(3)] == [0.07] * 3
    assert [teacher_temperature(e, 0.04, 0.07, 1) for e in range(3)] == [0.04, 0.07, 0.07]  # linspace(a, b, 1) = [a]


def test_head_is_the_official_shape(digits):
    m = build_method(make_cfg(methods=["dino"], dino={**SMALL, "head_bn": False}), "dino", digits)
    lin = [mod for mod in m.head.mlp if isinstance(mod, torch.nn.Linear)]
    assert [(x.in_features, x.out_features) for x in lin] == [(64, 32), (32, 32), (32, 16)]
    assert sum(isinstance(mod, torch.nn.GELU) for mod in m.head.mlp) == 2
    last = m.head.last_layer
    assert last.weight_v.shape == (64, 16) and torch.equal(last.weight_g, torch.ones(64, 1))
    assert not last.weight_g.requires_grad  # norm_last_layer: the row norms stay 1
    w = last.weight()
    assert torch.allclose(w.norm(dim=1), torch.ones(64), atol=1e-6)
    z = torch.randn(3, 64)
    out = m.head(z)
    ref = F.linear(F.normalize(m.head.mlp(z), dim=-1), w)
    assert out.shape == (3, 64) and torch.allclose(out, ref)
    # views: 2 global (the dataset's side), then the local crops
    specs = m.view_specs()
    assert [(s.count, s.size) for s in specs] == [(1, 0), (1, 0), (2, 4)]
    assert specs[2].scale == (0.2, 0.5) and specs[0].scale == (0.6, 1.0)


def test_teacher_gets_no_gradient_and_follows_the_student(digits):
    m = build_method(make_cfg(methods=["dino"], dino=SMALL), "dino", digits)
    m.teacher.total_steps = 10
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(8, 1, 8, 8, generator=g) for _ in range(2)] + \
            [torch.randn(8, 1, 4, 4, generator=g) for _ in range(2)]
    out = m(Batch(views, torch.zeros(8, dtype=torch.long), torch.arange(8)))
    assert math.isfinite(float(out.loss.detach())) and set(out.logs) == {"teacher_temp", "momentum", "teacher_entropy"}
    out.loss.backward()
    teacher = [*m.teacher_backbone.parameters(), *m.teacher_head.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in teacher)
    assert all(p.grad is not None for p in m.backbone.parameters())
    # the teacher: theta_t <- l theta_t + (1 - l) theta_s with l at step 0 of the cosine schedule
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.teacher_backbone.parameters()]
    centre = m.center.clone()
    pending = m._pending.clone()
    m.on_after_step(stepped=True)
    lam = cosine_momentum(0.95, 0, 10)
    for b, t, s in zip(before, m.teacher_backbone.parameters(), m.backbone.parameters()):
        assert torch.allclose(t, lam * b + (1 - lam) * s, atol=1e-6)
    assert int(m.teacher.step) == 1
    assert torch.allclose(m.center, 0.9 * centre + 0.1 * pending)
    assert m.encoder() is m.teacher_backbone  # the saved encoder is the teacher's


def test_last_layer_is_frozen_in_the_first_epoch(digits, tmp_path):
    from selfsup.engine.loop import pretrain

    cfg = make_cfg(methods=["dino"], dino={**SMALL, "epochs": 1, "batch_size": 256})
    init = build_method(cfg, "dino", digits)
    m, _ = pretrain(cfg, "dino", digits, tmp_path / "f" / "ck.pt")
    a, b = init.head.last_layer, m.head.last_layer
    assert torch.equal(a.weight_v, b.weight_v) and torch.equal(a.weight_g, b.weight_g)
    # the teacher's copy: the EMA of equal values (l x + (1 - l) x, exact up to rounding)
    assert torch.allclose(m.teacher_head.last_layer.weight_v, a.weight_v, rtol=1e-6, atol=1e-7)
    assert not torch.equal(init.head.mlp[0].weight, m.head.mlp[0].weight)  # the rest trained
    # without the freeze the same epoch moves it
    cfg0 = make_cfg(methods=["dino"], dino={**SMALL, "epochs": 1, "batch_size": 256, "freeze_last_layer": 0})
    m0, _ = pretrain(cfg0, "dino", digits, tmp_path / "g" / "ck.pt")
    assert not torch.equal(init.head.last_layer.weight_v, m0.head.last_layer.weight_v)


def test_released_last_layer_starts_without_optimiser_state(digits):
    from types import SimpleNamespace

    m = build_method(make_cfg(methods=["dino"], dino={**SMALL, "freeze_last_layer": 1}), "dino", digits)
    cleared = []
    ctx = SimpleNamespace(total_steps=4, reset_optimizer_state=cleared.append)
    m.on_epoch_start(0, ctx)
    assert cleared == [] and m._frozen is not None and int(m.epoch) == 0
    m.on_epoch_start(1, ctx)
    assert len(cleared) == 1 and [id(p) for p in cleared[0]] == [id(m.head.last_layer.weight_v)]
    assert m._frozen is None and int(m.epoch) == 1


def test_resume_is_exact(digits, tmp_path):
    """Killed in the middle of the frozen first epoch, resumed through the release of the last layer:
    teacher, centre, step counter, epoch and everything else bit-identical."""
    cfg = make_cfg(methods=["dino"], dino={**SMALL, "batch_size": 256}, log_every=1, checkpoint_minutes=0.0)
    assert_resume_is_exact(cfg, "dino", digits, tmp_path, kill_after=0, kill_at_batch=2)


def test_beats_random_init_on_digits(digits, tmp_path):
    """The digits default (vit_digits, 10 epochs): the saved encoder (the teacher) and the student both
    beat the random-init vit_digits on kNN-200 (measured: teacher 51.7, student 52.8, random 37.2)."""
    from selfsup.models.features import extract_features
    from selfsup.eval.knn import knn_eval
    from selfsup.engine.loop import pretrain

    cpu = torch.device("cpu")
    cfg = make_cfg(methods=["dino"], dino=DIGITS)

    def knn(net):
        tr = extract_features(net, digits.train, digits.meta, cpu)
        te = extract_features(net, digits.test, digits.meta, cpu)
        return knn_eval(tr, digits.train.y, te, digits.test.y, 200, 0.07, 10)["top1"]

    rand = knn(build_method(cfg, "dino", digits).encoder())
    m, hist = pretrain(cfg, "dino", digits, tmp_path / "dino" / "ck.pt")
    assert len(hist) == 10 and all(math.isfinite(h["loss"]) for h in hist)
    teacher, student = knn(m.encoder()), knn(m.backbone)
    assert teacher > rand + 5 and student > rand + 5, (teacher, student, rand)


# --------------------------------------------------------------------------- the official training extras
def _official_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """facebookresearch/dino utils.cosine_scheduler, as a slow per-iteration loop."""
    warmup_iters = warmup_epochs * niter_per_ep
    out = [start_warmup_value + (base - start_warmup_value) * i / (warmup_iters - 1) for i in range(warmup_iters)]
    n = epochs * niter_per_ep - warmup_iters
    out += [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    return out


def test_weight_decay_follows_the_official_cosine():
    from selfsup.engine.config import TrainCfg
    from selfsup.methods.dino import DINOCfg
    from selfsup.engine.schedules import wd_schedule

    c = DINOCfg(epochs=7, weight_decay=0.04, weight_decay_end=0.4)
    s = wd_schedule(c, 13)
    ref = _official_cosine_scheduler(0.04, 0.4, 7, 13)
    got = [s(i) for i in range(7 * 13)]
    assert len(got) == len(ref) and np.allclose(got, ref, rtol=0, atol=1e-15)
    assert abs(got[0] - 0.04) < 1e-15 and got[-1] < 0.4  # the official last value stops one step short of the end
    # equal ends: a constant, no schedule (the loop leaves the groups alone); other methods have none
    assert wd_schedule(DINOCfg(weight_decay=0.04, weight_decay_end=0.04), 13) is None
    assert wd_schedule(TrainCfg(), 13) is None


def test_final_lr_is_not_scaled_with_the_batch():
    from selfsup.engine.config import TrainCfg
    from selfsup.methods.dino import DINOCfg
    from selfsup.engine.schedules import lr_schedule

    c = DINOCfg(epochs=2, lr=0.0005, min_lr=1e-6, lr_scaling="linear", warmup_epochs=0)
    s = lr_schedule(c, 10, global_batch=512)
    assert s.base == 0.0005 * 2 and s.final == 1e-6  # main_dino.py: only lr is x B / 256
    assert lr_schedule(DINOCfg(epochs=2, min_lr=1e-6, lr_scaling="linear", scale_min_lr=True), 10, 512).final == 2e-6
    # the other methods' rule is unchanged: min_lr follows lr_scaling
    t = TrainCfg(lr_schedule="cosine", min_lr=1e-6, lr_scaling="linear")
    assert lr_schedule(t, 10, global_batch=512).final == 2e-6


def test_clip_grad_per_param_matches_the_official_loop():
    from selfsup.engine.optim import clip_grad_per_param

    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.zeros(*shape)) for shape in [(5, 4), (7,), (3, 3, 2), (2,)]]
    grads = [torch.randn(p.shape, generator=g) * scale for p, scale in zip(ps, [10.0, 0.1, 3.0, 1e-3])]
    for p, gr in zip(ps, grads):
        p.grad = gr.clone()
    ps.append(torch.nn.Parameter(torch.zeros(3)))  # no gradient: skipped
    clip_grad_per_param(ps, 3.0)
    for p, gr in zip(ps, grads):  # utils.clip_gradients, written out
        ref = gr.clone()
        norm = ref.norm(2)
        coef = 3.0 / (norm + 1e-6)
        if coef < 1:
            ref.mul_(coef)
        assert torch.equal(p.grad, ref)
    assert ps[-1].grad is None
    assert float(ps[0].grad.norm()) <= 3.0 + 1e-5 and torch.equal(ps[1].grad, grads[1])  # clipped apart


def test_student_has_drop_path_and_the_teacher_none(digits):
    import pytest

    from selfsup.core.config import ConfigError
    from selfsup.models.backbones import DropPath, vit_trunk

    def rates(backbone):
        return [m.p for m in vit_trunk(backbone).modules() if isinstance(m, DropPath)]

    m = build_method(make_cfg(methods=["dino"], dino={**SMALL, "drop_path": 0.1}), "dino", digits)
    assert rates(m.backbone) and max(rates(m.backbone)) == 0.1  # 0 -> 0.1 over the blocks
    assert rates(m.teacher_backbone) == [] or max(rates(m.teacher_backbone)) == 0.0
    # the same weights either way: drop path adds no parameter
    assert [n for n, _ in m.backbone.named_parameters()] == [n for n, _ in m.teacher_backbone.named_parameters()]
    off = build_method(make_cfg(methods=["dino"], dino={**SMALL, "drop_path": 0.0}), "dino", digits)
    assert rates(off.backbone) == [] or max(rates(off.backbone)) == 0.0
    with pytest.raises(ConfigError, match="drop_path"):
        build_method(make_cfg(methods=["dino"], dino={**SMALL, "backbone": "smallcnn", "drop_path": 0.1}), "dino",
                     digits)


def test_loop_schedules_weight_decay_on_the_regularised_group_only(digits, tmp_path):
    """One run: the last step's weight decay is the cosine's value at that step (logged), and the
    checkpointed optimiser has it on the decayed group, 0 on the biases / norms."""
    from selfsup.core.io import load_torch
    from selfsup.methods.dino import DINOCfg
    from selfsup.engine.schedules import wd_schedule
    from selfsup.engine.loop import pretrain

    cfg = make_cfg(methods=["dino"], dino={**SMALL, "epochs": 1, "batch_size": 256})
    _, hist = pretrain(cfg, "dino", digits, tmp_path / "w" / "ck.pt")
    ck = load_torch(tmp_path / "w" / "ck.pt")
    steps = ck["step"]
    want = wd_schedule(DINOCfg(epochs=1, weight_decay=0.04, weight_decay_end=0.4), steps)(steps - 1)
    assert hist[-1]["weight_decay"] == want and want > 0.04
    assert [g["weight_decay"] for g in ck["optimizer"]["param_groups"]] == [want, 0.0]

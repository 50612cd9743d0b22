"""SwAV: the Sinkhorn codes meet the equal-partition marginals and equal the paper's pseudocode
(appendix A.1), the swapped-prediction loss equals a slow per-sample transcription of eq. 4, the
prototypes stay unit-norm and do not move while frozen, the queue fills and joins the codes, an
exact resume after a kill, and the digits default beating the random-init encoder. Two gloo
processes: tests/test_swav_dist.py."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_resume_is_exact, knn_after_pretrain, make_cfg
from selfsup.engine.contract import Batch
from selfsup.cluster.sinkhorn import swav_sinkhorn
from selfsup.losses.prototypes import swav_loss
from selfsup.engine.loop import build_method, pretrain

# the digits defaults of the swav block proposed for params.yaml
SWAV = {"epochs": 10, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "cosine",
        "augment": "crop", "crop_scale": [0.3, 1.0], "jitter": [0.4, 0.4, 0.4, 0.1], "jitter_p": 0.8,
        "grayscale_p": 0.0, "blur_p": 0.0, "n_large": 2, "n_small": 2, "small_size": 6, "small_scale": [0.3, 0.7],
        "proj_hidden": 256, "feat_dim": 64, "prototypes": 100, "temperature": 0.1, "epsilon": 0.02,
        "sinkhorn_iters": 3, "crops_for_assign": [0, 1], "freeze_prototypes_iters": 12, "queue_length": 0,
        "epoch_queue_starts": 15}


def subset(data, n=400):
    """The first n training images (runs that check mechanics, not accuracy)."""
    from selfsup.data.prepared import Data, Split

    return Data(Split(data.train.x[:n], data.train.y[:n]), data.test, {**data.meta, "n_train": n})


def unit_scores(b, k, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, d, generator=g), dim=1)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ c.t()  # (B, K) cosine scores, as z^T c with unit z and c


def paper_sinkhorn(scores, eps=0.05, niters=3):
    """The appendix A.1 pseudocode, float64: Q = exp(scores / eps)^T, Q /= sum(Q); niters x (rows of
    Q, the prototypes, scaled to r = 1/K; columns, the samples, to c = 1/B); columns normalised."""
    q = torch.exp(scores.double() / eps).t()  # (K, B)
    q /= q.sum()
    k, b = q.shape
    r, c = torch.ones(k, dtype=torch.float64) / k, torch.ones(b, dtype=torch.float64) / b
    for _ in range(niters):
        u = q.sum(dim=1)
        q *= (r / u).unsqueeze(1)
        q *= (c / q.sum(dim=0)).unsqueeze(0)
    return (q / q.sum(dim=0, keepdim=True)).t()  # (B, K)


def test_sinkhorn_codes_meet_the_marginals_and_the_papers_pseudocode():
    s = unit_scores(64, 10)
    q = swav_sinkhorn(s, 0.05, 3)
    assert q.shape == (64, 10) and (q >= 0).all()
    assert torch.allclose(q.double(), paper_sinkhorn(s, 0.05, 3), atol=1e-6)
    # the last normalisation is the row (sample) one: every code is a distribution, exactly
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-6)
    # the prototype (column) marginal is the equal partition B/K only approximately after 3 iterations
    # and converges to it with more
    cols3 = q.sum(0)
    assert (cols3 - 6.4).abs().max() < 0.5 * 6.4, cols3
    cols = swav_sinkhorn(s, 0.05, 200).sum(0)
    assert (cols - 6.4).abs().max() < 1e-3 * 6.4, cols
    assert (cols - 6.4).abs().max() < (cols3 - 6.4).abs().max()
    # the per-prototype shift: the codes do not change when a prototype's scores all move by a constant
    # (its first normalisation removes it), and stay finite where exp(scores / eps) overflows float32
    big = s + torch.linspace(5.0, 10.0, 10)
    assert not torch.isfinite(torch.exp(big / 0.05)).all()
    assert torch.allclose(swav_sinkhorn(big, 0.05, 3), q, atol=1e-5)


def test_loss_matches_a_per_sample_reference_of_eq_4():
    torch.manual_seed(0)
    v, b, k, t = 4, 5, 7, 0.1
    scores = torch.randn(v, b, k, requires_grad=True)
    codes = torch.softmax(torch.randn(2, b, k), dim=2)
    assign = [0, 1]
    loss = swav_loss(scores, codes, assign, t)
    # eq. 4: sum over the assigned crops i and the other crops v != i of l(z_v, q_i), with
    # l(z, q) = -sum_k q^k log p^k, p = softmax(z^T C / tau); averaged as the official code
    sd = scores.detach().double()
    ref = 0.0
    for i, crop in enumerate(assign):
        sub = 0.0
        for u in range(v):
            if u == crop:
                continue
            for n in range(b):
                logits = [float(sd[u, n, j]) / t for j in range(k)]
                m = max(logits)
                lse = m + math.log(sum(math.exp(x - m) for x in logits))
                sub += -sum(float(codes[i, n, j]) * (logits[j] - lse) for j in range(k)) / b
        ref += sub / (v - 1)
    ref /= len(assign)
    assert abs(float(loss.detach()) - ref) < 1e-5
    loss.backward()
    assert scores.grad is not None and codes.grad is None  # the codes are targets


def small_method(digits, **over):
    cfg = make_cfg(methods=["swav"], swav={**SWAV, "prototypes": 12, "feat_dim": 16, "proj_hidden": 32, **over})
    return build_method(cfg, "swav", digits)


def fake_batch(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(b, 1, 8, 8, generator=g) for _ in range(2)] + [torch.randn(b, 1, 6, 6, generator=g)
                                                                         for _ in range(2)]
    return Batch(views, torch.zeros(b, dtype=torch.long), torch.arange(b))


def test_prototypes_are_unit_norm_and_frozen_for_the_first_iterations(digits):
    m = small_method(digits, freeze_prototypes_iters=2)
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    ctx = SimpleNamespace(reset_optimizer_state=lambda ps: [opt.state.pop(p, None) for p in ps])
    m.on_epoch_start(0, ctx)
    w0 = m.prototypes.weight.detach().clone()
    assert torch.allclose(w0.norm(dim=1), torch.ones(12), atol=1e-6)  # normalised at construction
    for step in range(4):
        m.train()
        out = m(fake_batch(seed=step))
        out.loss.backward()
        assert m.prototypes.weight.grad is not None  # DDP needs the gradient; the step is undone
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.on_after_step(True)
        w = m.prototypes.weight.detach()
        if step < 2:  # frozen: exactly as before, no optimiser state (as the official p.grad = None)
            assert torch.equal(w, w0) and m.prototypes.weight not in opt.state
        else:
            assert not torch.equal(w, w0) and m.prototypes.weight in opt.state
        assert torch.allclose(w.norm(dim=1), torch.ones(12), atol=1e-6)  # unit after every step
    assert int(m.steps_done) == 4


def test_prototypes_do_not_move_in_a_frozen_run(digits, tmp_path):
    data = subset(digits)
    cfg = {**SWAV, "epochs": 1, "batch_size": 100}
    init = build_method(make_cfg(methods=["swav"], swav=cfg), "swav", data).prototypes.weight.detach()
    frozen, _ = pretrain(make_cfg(methods=["swav"], swav={**cfg, "freeze_prototypes_iters": 4}), "swav", data,
                         tmp_path / "a" / "ck.pt")
    assert torch.equal(frozen.prototypes.weight.detach(), init)  # 4 steps, all frozen
    free, _ = pretrain(make_cfg(methods=["swav"], swav={**cfg, "freeze_prototypes_iters": 0}), "swav", data,
                       tmp_path / "b" / "ck.pt")
    w = free.prototypes.weight.detach()
    assert not torch.equal(w, init) and torch.allclose(w.norm(dim=1), torch.ones(len(w)), atol=1e-6)


def test_queue_fills_and_joins_the_codes(digits):
    b = 8
    m = small_method(digits, batch_size=b, queue_length=2 * b, epoch_queue_starts=1, freeze_prototypes_iters=0)
    ctx = SimpleNamespace(reset_optimizer_state=None)
    m.train()
    m.on_epoch_start(0, ctx)  # before epoch_queue_starts: nothing is stored
    m(fake_batch(seed=0))
    m.on_after_step(True)
    assert int(m.queue_rows) == 0 and float(m.queue.abs().sum()) == 0.0
    m.on_epoch_start(1, ctx)
    seen = []
    for step in range(3):
        batch = fake_batch(seed=10 + step)
        with torch.no_grad():
            z = F.normalize(m.projector(torch.cat([m.backbone(torch.cat(batch.views[:2])),
                                                   m.backbone(torch.cat(batch.views[2:]))])), dim=1)
        out = m(batch)
        # not in use until full (official), then in use
        assert float(out.logs["queue_used"]) == (1.0 if step == 2 else 0.0)
        m.on_after_step(True)
        seen.append(z[:2 * b].view(2, b, -1))  # the assigned crops 0 and 1, (A, B, D)
        assert int(m.queue_rows) == min(2 * b, (step + 1) * b)
    # newest first: the last batch, then the one before (BN makes the stored rows depend on the batch,
    # so compare with the same forward's embeddings: the model is unchanged between these calls)
    assert torch.allclose(m.queue[:, :b], seen[2], atol=1e-6)
    assert torch.allclose(m.queue[:, b:], seen[1], atol=1e-6)
    # in use: the batch's codes are the last rows of Sinkhorn on [queue scores; batch scores]
    batch = fake_batch(seed=99)
    with torch.no_grad():
        z = F.normalize(m.projector(torch.cat([m.backbone(torch.cat(batch.views[:2])),
                                               m.backbone(torch.cat(batch.views[2:]))])), dim=1)
        scores = m.prototypes(z)
        codes = m.codes(scores, b)
        w = m.prototypes.weight
        for i in range(2):
            ref = swav_sinkhorn(torch.cat([m.queue[i] @ w.t(), scores[i * b:(i + 1) * b]]), m.cfg.epsilon,
                                m.cfg.sinkhorn_iters)[-b:]
            alone = swav_sinkhorn(scores[i * b:(i + 1) * b], m.cfg.epsilon, m.cfg.sinkhorn_iters)
            assert torch.allclose(codes[i], ref, atol=1e-6) and not torch.allclose(codes[i], alone, atol=1e-3)


def test_queue_length_is_rounded_down_to_a_multiple_of_the_global_batch(digits, monkeypatch):
    """Official main_swav.py: args.queue_length -= args.queue_length % (args.batch_size * args.world_size)."""
    import pytest

    from selfsup.core import dist
    from selfsup.core.config import ConfigError
    from selfsup.methods.swav import effective_queue_length

    assert effective_queue_length(3840, 256, 1) == 3840  # the official batch-256 recipe: 15 batches
    assert effective_queue_length(3900, 256, 1) == 3840
    assert effective_queue_length(3840, 64, 8) == 3584  # 7 global batches of 512
    assert effective_queue_length(0, 256, 4) == 0  # no queue stays no queue
    with pytest.raises(ConfigError, match="swav.queue_length: 100 is below one global batch"):
        effective_queue_length(100, 64, 2)  # official: silently 0, no queue
    m = small_method(digits, batch_size=8, queue_length=20)
    assert m.queue_length == 16 and tuple(m.queue.shape) == (2, 16, 16) and m.cfg.queue_length == 20
    m.train()
    m.on_epoch_start(m.cfg.epoch_queue_starts, SimpleNamespace(reset_optimizer_state=None))
    for step in range(2):
        m(fake_batch(seed=step))
        m.on_after_step(True)
    assert m.queue_in_use() and int(m.queue_rows) == 16  # two whole batches fill it
    monkeypatch.setattr(dist, "world", lambda: 3)  # the global batch is 8 per process x 3 processes
    m3 = small_method(digits, batch_size=8, queue_length=60)
    assert m3.queue_length == 48 and tuple(m3.queue.shape) == (2, 48, 16)
    with pytest.raises(ConfigError, match="swav.queue_length"):
        small_method(digits, batch_size=8, queue_length=20)


def test_swav_resume_is_exact(digits, tmp_path):
    # 4 batches an epoch; the queue starts in epoch 2 and is in use from its third batch on; the
    # prototypes are frozen for the first 5 steps (one of them in epoch 2)
    cfg = make_cfg(methods=["swav"], swav={**SWAV, "epochs": 2, "batch_size": 128, "queue_length": 256,
                                           "epoch_queue_starts": 1, "freeze_prototypes_iters": 5},
                   log_every=1, checkpoint_minutes=0.0)
    hist = assert_resume_is_exact(cfg, "swav", subset(digits), tmp_path, kill_after=1, kill_at_batch=3)
    assert [h["queue_used"] for h in hist] == [0.0, 0.5]  # the last 2 of 4 batches used it


def test_swav_beats_random_init_on_digits(digits, tmp_path):
    rand, _ = knn_after_pretrain("random", digits, tmp_path)
    swav, hist = knn_after_pretrain("swav", digits, tmp_path, swav=SWAV)
    assert hist[-1]["loss"] < hist[0]["loss"] and swav > rand + 2.0, (swav, rand)
    assert np.isfinite([h["loss"] for h in hist]).all()


def test_pil_blur_matches_pillows_gaussian_blur():
    """swav.blur_kernel pil (SwAV's PILRandomGaussianBlur, solo-learn's GaussianBlur): Pillow's
    ImageFilter.GaussianBlur(radius=sigma) on a small image, within its 8-bit rounding of each of the
    six box passes; SimCLR's kernel of 10 % of the side (3 px here) cuts the larger sigmas and misses."""
    from PIL import Image, ImageFilter

    from selfsup.augment.batched import gaussian_blur, pil_gaussian_blur

    img = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].double()  # (1, 3, 24, 20) in [0, 255]
    for sigma in (0.1, 1.3, 2.0):
        ref = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=sigma))).astype(np.float64)
        got = pil_gaussian_blur(x, sigma)[0].permute(1, 2, 0).numpy()
        assert np.abs(got - ref).max() <= 3.5 and np.abs(got - ref).mean() <= 1.2, sigma
        if sigma >= 1.3:
            simclr = gaussian_blur(x, torch.tensor([sigma], dtype=torch.float64), 3)[0].permute(1, 2, 0).numpy()
            assert np.abs(simclr - ref).mean() > 5.0
    two = pil_gaussian_blur(torch.cat([x, x]), torch.tensor([0.3, 2.0]))  # per-image sigmas in one call
    torch.testing.assert_close(two[1], pil_gaussian_blur(x, 2.0)[0])
    torch.testing.assert_close(two[0], pil_gaussian_blur(x, 0.3)[0])


def test_swav_defaults_are_the_official_larc_and_pil_blur(digits):
    """SwAV's typed defaults: LARS with apex LARC's trust ratio, and every crop blurred the PIL way (the
    blur step of its views is pil_gaussian_blur); simclr restores the 10 % kernel; a bad rule is named."""
    from selfsup.augment.batched import apply_params, pil_gaussian_blur, sample_params
    from selfsup.core.config import ConfigError

    cfg = make_cfg(methods=["swav"], swav={**SWAV, "blur_p": 1.0})
    assert cfg.method("swav").lars_rule == "larc" and cfg.method("swav").blur_kernel == "pil"
    specs = build_method(cfg, "swav", digits).view_specs()
    assert [s.blur_rule for s in specs] == ["pil", "pil"] and specs[1].size == 6
    spec = specs[0]
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    p = sample_params(spec, 3, 8, 8, torch.Generator().manual_seed(1))
    plain = __import__("dataclasses").replace(spec, blur_p=0.0)
    torch.testing.assert_close(apply_params(x, spec, p), pil_gaussian_blur(apply_params(x, plain, p), p.sigma))
    other = make_cfg(methods=["swav"], swav={**SWAV, "blur_kernel": "simclr"})
    assert {s.blur_rule for s in build_method(other, "swav", digits).view_specs()} == {"simclr"}
    with pytest.raises(ConfigError, match="swav.blur_kernel"):
        make_cfg(methods=["swav"], swav={**SWAV, "blur_kernel": "box"})

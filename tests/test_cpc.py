"""CPC v2 (Hénaff et al. 2020): the patch grid, the context network's mask, the InfoNCE against a
per-sample reference written from the paper, the layer-norm encoder that saves and loads with its
grid, per-patch augmentation, an exact resume, and learning on the digits against the same encoder
at its random init."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_resume_is_exact, knn_after_pretrain, make_cfg
from test_colorization import CPU, colour_data
from selfsup.core.config import ConfigError
from selfsup.engine.contract import Batch
from selfsup.engine.loop import build_method
from selfsup.losses.cpc import cpc_candidates, cpc_infonce
from selfsup.models.backbones import grid_side, load_backbone, patch_grid, save_backbone
from selfsup.models.context import MaskedContext

# a 7 x 7 grid of 4 px patches on a 2 px pitch over the 16 px views: the paper's ratios (64 / 32 / 256)
SMALL = {"epochs": 2, "batch_size": 8, "lr": 1e-3, "view_size": 16, "patch": 4, "stride": 2,
         "context_width": 16, "context_blocks": 2, "target_dim": 8, "crop_scale": [0.5, 1.0]}


def cpc(data, **over):
    cfg = make_cfg(methods=["cpc"], cpc={**SMALL, **over})
    return cfg, build_method(cfg, "cpc", data)


# ----------------------------------------------------------------- the grid
def test_patch_grid_cuts_the_overlapping_patches_row_by_row():
    x = torch.arange(2 * 3 * 10 * 10, dtype=torch.float32).view(2, 3, 10, 10)
    p = patch_grid(x, 4, 3)  # (10 - 4) / 3 + 1 = 3 per side
    assert p.shape == (2, 3, 3, 3, 4, 4) and grid_side(10, 4, 3) == 3
    for i in range(3):
        for j in range(3):
            assert torch.equal(p[:, i, j], x[:, :, 3 * i:3 * i + 4, 3 * j:3 * j + 4])
    assert grid_side(256, 64, 32) == 7  # the paper's grid
    with pytest.raises(ValueError, match="do not tile"):
        patch_grid(x, 4, 4)


def test_the_grid_geometry_is_checked_before_training(digits):
    with pytest.raises(ConfigError, match="cpc.stride"):
        cpc(digits, patch=4, stride=5)  # 16 - 4 is not a multiple of 5
    with pytest.raises(ConfigError, match="cpc.steps_to_predict"):
        cpc(digits, patch=8, stride=4)  # a 3 x 3 grid cannot predict 3 rows down
    _, m = cpc(digits, patch=0, stride=0)  # 0: the paper's ratios, a quarter of the view on half its pitch
    assert m.backbone.grid == {"view": 16, "patch": 4, "stride": 2}
    _, m = cpc(digits, eval_stride=4)  # a coarser evaluated grid of the same patches: 4 x 4
    assert m.backbone.grid == {"view": 16, "patch": 4, "stride": 4}
    with pytest.raises(ConfigError, match="cpc.eval_stride"):
        cpc(digits, eval_stride=5)


# ----------------------------------------------------------------- the context network's mask
def test_a_context_never_sees_its_row_below():
    torch.manual_seed(0)
    net = MaskedContext(6, width=5, blocks=3)
    z = torch.randn(2, 6, 7, 5)
    base = net(z)
    for r in range(1, 7):  # change every row from r down: the contexts of rows < r stay the same
        z2 = z.clone()
        z2[:, :, r:] = torch.randn_like(z2[:, :, r:])
        out = net(z2)
        assert torch.equal(out[:, :, :r], base[:, :, :r]), r
        assert not torch.allclose(out[:, :, r:], base[:, :, r:]), r  # and the rest does depend on them
    # a row reaches `blocks` rows down: the context of row 4 sees row 1, not row 0
    z3 = z.clone()
    z3[:, :, 0] += 1.0
    assert torch.equal(net(z3)[:, :, 4:], base[:, :, 4:]) and not torch.equal(net(z3)[:, :, 3], base[:, :, 3])


def test_each_prediction_reads_contexts_above_its_target_only(digits):
    """The whole forward: the loss of the prediction of row r does not change when rows >= r of the
    image change, for every direction (through the method's orientation of the grid)."""
    _, m = cpc(digits, directions=["down", "up", "right", "left"], patch_flip=False, patch_crop=1.0)
    torch.manual_seed(1)
    z = torch.randn(3, m.backbone.out_dim, 7, 7)
    from selfsup.methods.cpc import orient

    for r in m.cfg.directions:
        zo = orient(z, r)
        ctx = m.context[r](zo)
        z2 = zo.clone()
        z2[:, :, 4:] += 1.0  # rows 4.. of the turned grid (the targets of offset 3 from rows 1..)
        assert torch.equal(m.context[r](z2)[:, :, :4], ctx[:, :, :4]), r
        assert torch.equal(orient(orient(z, r), r) if r in ("down", "up") else z, z)


# ----------------------------------------------------------------- the loss
def reference_infonce(pred, targets, k):
    """-log softmax of each prediction's dot product with its target among every target of the batch
    (Hénaff et al. 2020, sec. 3), one location at a time."""
    b, h, w, t = targets.shape
    every = targets.reshape(-1, t)
    total, n = 0.0, 0
    for bi in range(b):
        for i in range(h - k):
            for j in range(w):
                scores = [float(pred[bi, i, j] @ every[c]) for c in range(len(every))]
                pos = bi * h * w + (i + k) * w + j
                m = max(scores)
                lse = m + math.log(sum(math.exp(s - m) for s in scores))
                total += lse - scores[pos]
                n += 1
    return total / n


def test_infonce_equals_the_per_sample_reference():
    g = torch.Generator().manual_seed(3)
    targets = torch.randn(3, 5, 4, 6, generator=g, dtype=torch.float64)
    for k in (1, 3):
        pred = torch.randn(3, 5 - k, 4, 6, generator=g, dtype=torch.float64)
        got = float(cpc_infonce(pred, targets, k))
        assert got == pytest.approx(reference_infonce(pred, targets, k), rel=1e-6), k
    # one process: the gathered candidates are the batch's own, in the same order
    cand, start = cpc_candidates(targets, gather=True)
    assert start == 0 and torch.equal(cand, targets.reshape(-1, 6))
    with pytest.raises(ValueError, match="offset 2"):
        cpc_infonce(torch.randn(3, 2, 4, 6), targets, 2)


def test_the_method_loss_is_the_sum_over_directions_and_offsets(digits):
    _, m = cpc(digits, steps_to_ignore=1, steps_to_predict=3, directions=["down", "up"])
    assert m.cfg.offsets == [2, 3]
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    torch.manual_seed(7)
    out = m(Batch([x], torch.zeros(4, dtype=torch.long), torch.arange(4)))
    parts = {k: float(v) for k, v in out.logs.items()}
    assert set(parts) == {"loss_down_2", "loss_down_3", "loss_up_2", "loss_up_3"}
    assert float(out.loss.detach()) == pytest.approx(sum(parts.values()), rel=1e-5)
    # the down loss by hand, from the same patch draws
    torch.manual_seed(7)
    z = m.embed(x)
    t = m.target(z).permute(0, 2, 3, 1)
    ctx = m.context["down"](z)
    pred = (m.predict["down"][0](ctx[:, :, :-2]) * 0.1).permute(0, 2, 3, 1)
    assert float(cpc_infonce(pred, t, 2).detach()) == pytest.approx(parts["loss_down_2"], rel=1e-5)


# ----------------------------------------------------------------- the encoder
def test_layer_norm_encoder_treats_each_patch_alone_and_loads_with_its_grid(digits, tmp_path):
    cfg, m = cpc(digits)
    bb = m.backbone.eval()
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in bb.modules())
    assert any(isinstance(mod, nn.GroupNorm) for mod in bb.modules())
    m.train()
    p = torch.randn(6, 1, 4, 4)
    with torch.no_grad():  # in training mode too, a patch's embedding does not depend on the others
        assert torch.allclose(bb.trunk(p)[:2], bb.trunk(p[:2]), atol=1e-6)
    bb.eval()
    x = torch.randn(3, 1, 8, 8)  # a digits test image: resized to the 16 px view, its 7 x 7 patches averaged
    with torch.no_grad():
        big = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
        want = bb.trunk(patch_grid(big, 4, 2).flatten(0, 2)).view(3, 49, -1).mean(1)
        assert torch.allclose(bb(x), want, atol=1e-6)
    save_backbone(tmp_path / "m.pt", m, cfg, digits.meta)
    net = load_backbone(tmp_path / "m.pt", CPU)
    assert net.grid == bb.grid and net.norm == "layer"
    with torch.no_grad():
        assert torch.allclose(net(x), bb(x), atol=1e-6)
    # the per-layer probes see per-image activations (each layer's patch activations averaged)
    from selfsup.eval.layer_probes import layer_features

    feats = layer_features(net, digits.test, digits.meta, CPU, ["block1", "block3"], indices=torch.arange(5).numpy())
    assert feats["block1"].shape[0] == 5 and feats["block3"].shape[0] == 5
    # eval_on: image keeps the trunk on the whole image
    _, m2 = cpc(digits, eval_on="image")
    assert m2.backbone.grid is None


def test_patch_augmentation_flips_drops_colours_and_sub_crops():
    data = colour_data(side=16)
    _, m = cpc(data, patch_crop=0.5)
    x = torch.rand(400, 3, 4, 4) + 1.0  # no zero anywhere before the augmentation
    torch.manual_seed(0)
    out = m.augment_patches(x)
    kept = (out.abs().flatten(2).sum(2) > 0)  # (N, 3): channels left
    assert (kept.sum(1) == 1).all()  # two of three channels dropped in every patch
    assert (out != 0).flatten(1).sum(1).eq(4).all()  # a 2 x 2 window of the one channel kept
    _, plain = cpc(data, patch_crop=1.0, colour_drop=False, patch_flip=True)
    torch.manual_seed(0)
    flipped = plain.augment_patches(x)
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and 120 < int(mirrored.sum()) < 280  # about half of them mirrored


# ----------------------------------------------------------------- training
def test_resume_is_exact(digits_folder, tmp_path):
    from test_distributed import small_data

    cfg = make_cfg(methods=["cpc"], cpc={**SMALL, "epochs": 2, "batch_size": 16}, log_every=1,
                   checkpoint_minutes=0)
    assert_resume_is_exact(cfg, "cpc", small_data(digits_folder, 48), tmp_path, kill_after=1, kill_at_batch=1)


def test_learns_on_digits_beyond_its_random_init(digits, tmp_path):
    from selfsup.eval.knn import knn_eval
    from selfsup.models.features import extract_features

    over = {"epochs": 3, "batch_size": 32, "lr": 1e-3, "view_size": 16, "patch": 4, "stride": 2,
            "context_width": 64, "context_blocks": 2}
    _, init = cpc(digits, **over)
    enc = init.backbone.eval()
    before = knn_eval(extract_features(enc, digits.train, digits.meta, CPU), digits.train.y,
                      extract_features(enc, digits.test, digits.meta, CPU), digits.test.y, 200, 0.07, 10)["top1"]
    after, hist = knn_after_pretrain("cpc", digits, tmp_path, cpc=over)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert after > before + 3, (before, after)

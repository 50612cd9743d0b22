"""Relative patch location as the released code trains it (cdoersch/deepcontext train.py): the dense
pairs of the grid with their labels, the prep_image preprocessing (pixelation, colour dropping with
uniform noise, per-patch mean removal and RMS 50 in pixel levels) against a slow per-patch
reference, the fc7 / fc8 / fc9 head and the summed loss."""
import math

import torch
from torch import nn

from conftest import make_cfg
from selfsup.engine.contract import Batch
from selfsup.methods.relloc import (NEIGHBOURS, RelLoc, dense_pairs, drop_colours, pixelate,
                                    resample_matrix)
from selfsup.engine.loop import build_method


def test_dense_pairs_are_every_adjacent_pair_in_both_orders():
    pairs, labels = dense_pairs()
    assert pairs.shape == (40, 2) and labels.shape == (40,)  # 20 adjacent pairs of a 3 x 3 grid, both orders
    got = {tuple(p) for p in pairs.tolist()}
    assert len(got) == 40 and all((b, a) in got for a, b in got)
    for (a, b), lab in zip(pairs.tolist(), labels.tolist()):
        (ra, ca), (rb, cb) = divmod(a, 3), divmod(b, 3)
        assert max(abs(ra - rb), abs(ca - cb)) == 1
        assert NEIGHBOURS[lab] == (rb - ra + 1) * 3 + (cb - ca + 1)  # pos2lbl: the second relative to the first


def _bilinear_ref(v, s):
    """1-D linear resampling of ``v`` to ``s`` samples, pixel centres aligned, edges replicated."""
    n = len(v)
    out = []
    for i in range(s):
        t = min(max((i + 0.5) * n / s - 0.5, 0.0), n - 1.0)
        lo = int(math.floor(t))
        hi = min(lo + 1, n - 1)
        out.append(v[lo] * (1 - (t - lo)) + v[hi] * (t - lo))
    return out


def test_pixelation_is_bilinear_down_and_back():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 12, 12, generator=g, dtype=torch.float64)
    sides = torch.tensor([5, 0, 3])
    out = pixelate(x, sides)
    assert torch.equal(out[1], x[1])  # side 0: untouched
    for n in (0, 2):
        s = int(sides[n])
        for c in range(2):
            rows = [_bilinear_ref(r, s) for r in x[n, c].tolist()]  # (12, s)
            cols = [_bilinear_ref(list(col), s) for col in zip(*rows)]  # (s, s) transposed
            small = [list(r) for r in zip(*cols)]  # (s, s)
            rows = [_bilinear_ref(r, 12) for r in small]  # (s, 12)
            back = [_bilinear_ref(list(col), 12) for col in zip(*rows)]  # (12, 12) transposed
            ref = torch.tensor(back, dtype=torch.float64).t()
            assert torch.allclose(out[n, c], ref, atol=1e-9)
    assert torch.allclose(resample_matrix(7, 7), torch.eye(7), atol=1e-6)  # same size: the identity


def _prep_image_ref(patch, keep, noise, side):
    """The released prep_image for one (3, p, p) patch in pixel levels: optional pixelation, one channel
    kept (its mean removed), the others uniform noise - 0.5, the patch scaled to RMS 50."""
    im = patch.clone()
    if side:
        im = pixelate(im[None], torch.tensor([side]))[0]
    for c in range(3):
        im[c] = im[c] - im[c].mean() if c == keep else noise[c] - 0.5
    return im / im.pow(2).mean().sqrt() * 50.0


def test_prepare_matches_prep_image_per_patch():
    std = [0.25, 0.2, 0.3]
    cfg = make_cfg(methods=["relloc"], relloc={"pixelation_p": 0.5, "patch_norm": True, "chroma": "drop",
                                               "drop_noise": "uniform"})
    m = build_method(cfg, "relloc", _rgb_data())  # from_data: the dataset's std
    assert isinstance(m, RelLoc) and m.levels.flatten().tolist() == [255 * v for v in std]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 9, 9, generator=g, dtype=torch.float64)
    m.levels = m.levels.double()
    torch.manual_seed(11)
    out = m.prepare(x)
    torch.manual_seed(11)  # the same draws by hand: pixelation, then the kept channel, then the noise
    sides = m.pixel_sides(6, 9, x.device)
    keep = torch.randint(0, 3, (6,))
    noise = torch.rand_like(x)
    levels = torch.tensor(std, dtype=torch.float64).view(3, 1, 1) * 255
    for n in range(6):
        ref = _prep_image_ref(x[n] * levels, int(keep[n]), noise[n], int(sides[n])) / levels
        assert torch.allclose(out[n], ref, atol=1e-9)
    assert bool((sides > 0).any()) and bool((sides == 0).any())
    assert int(sides.max()) <= 94 * 9 // 96  # the official 10-94 px sides, scaled to 9 px patches


def test_pixel_sides_follow_the_official_range():
    m = build_method(make_cfg(methods=["relloc"], relloc={"pixelation_p": 1.0}), "relloc", _rgb_data())
    torch.manual_seed(0)
    s = m.pixel_sides(20000, 96, torch.device("cpu"))
    assert int(s.min()) == 10 and int(s.max()) == 94  # int(sqrt(U(100, 9025)))
    # uniform in the total pixel count: about half the patches below sqrt((100 + 9025) / 2) = 67.5
    assert abs(float((s <= 67).float().mean()) - 0.5) < 0.02
    m.cfg.pixelation_p = 0.33
    assert abs(float((m.pixel_sides(20000, 96, torch.device("cpu")) > 0).float().mean()) - 0.33) < 0.02


def test_uniform_colour_dropping():
    x = torch.randn(4, 3, 5, 5) * 40
    keep = torch.tensor([0, 1, 2, 1])
    draw = torch.rand(4, 3, 5, 5)
    d = drop_colours(x, keep, "uniform", draw)
    for b in range(4):
        for c in range(3):
            assert torch.equal(d[b, c], x[b, c] if c == keep[b] else draw[b, c] - 0.5)


def test_head_and_summed_dense_loss():
    cfg = make_cfg(methods=["relloc"], relloc={"view_size": 24, "patch_jitter": 0, "pairs_per_image": "dense",
                                               "grids_per_image": 2, "loss_reduction": "sum", "head_layers": 2,
                                               "head_bn": True, "hidden": 16})
    m = build_method(cfg, "relloc", _rgb_data()).eval()
    lin = [mod for mod in m.head if isinstance(mod, nn.Linear)]
    assert [(mod.in_features, mod.out_features) for mod in lin] == [(2 * m.backbone.out_dim, 16), (16, 16), (16, 8)]
    bns = [mod for mod in m.head if isinstance(mod, nn.BatchNorm1d)]
    assert len(bns) == 1 and not bns[0].affine  # fc7 with BatchNorm without scale, fc8 without
    assert m.view_specs()[0].count == 2
    views = [torch.randn(3, 3, 24, 24), torch.randn(3, 3, 24, 24)]
    torch.manual_seed(5)
    with torch.no_grad():
        out = m(Batch(views, torch.zeros(3, dtype=torch.long), torch.arange(3)))
    torch.manual_seed(5)  # by hand: every grid cut (one view after the other), prepared, all 40 pairs
    grids = torch.cat([m.sample_grid(v) for v in views])  # (6, 9, 3, 5, 5)
    with torch.no_grad():
        f = m.backbone(m.prepare(grids.flatten(0, 1))).view(6, 9, -1)
        pairs, labels = dense_pairs()
        total = 0.0
        for g in range(6):
            logits = m.head(torch.cat([f[g, pairs[:, 0]], f[g, pairs[:, 1]]], 1))
            total += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
    assert abs(float(out.loss) - total) < 1e-3 * max(1.0, abs(total))


def _rgb_data(n=8, side=24):
    import numpy as np

    from selfsup.data.prepared import Data, Split

    rng = np.random.default_rng(0)

    def split(k):
        return Split(rng.integers(0, 256, (k, side, side, 3), dtype=np.uint8), (np.arange(k) % 4).astype(np.int64))

    meta = {"name": "colour stand-in", "classes": list("abcd"), "n_train": n, "n_test": n // 2,
            "image_size": [side, side], "channels": 3, "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]}
    return Data(split(n), split(n // 2), meta)

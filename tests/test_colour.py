"""Tests of selfsup.augment.colour (Zhang, Isola & Efros, "Colorful Image Colorization")."""

import math
import re

import pytest
import torch

import selfsup.augment.colour as colour
from selfsup.augment.colour import (
    ab_bins,
    annealed_mean,
    empirical_prior,
    in_gamut,
    lab_image,
    lab_to_rgb,
    nearest_bin,
    rebalance_weights,
    rgb_to_lab,
    smooth_prior,
    soft_encode,
)
from selfsup.losses.colourisation import colour_loss

GRID = 10.0


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _ref_rgb_to_lab(r, g, b):
    """Per-colour reference in plain Python floats, written from the formulas."""

    def lin(c):
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    rl, gl, bl = lin(r), lin(g), lin(b)
    x = 0.4124564 * rl + 0.3575761 * gl + 0.1804375 * bl
    y = 0.2126729 * rl + 0.7151522 * gl + 0.0721750 * bl
    z = 0.0193339 * rl + 0.1191920 * gl + 0.9503041 * bl
    x, y, z = x / 0.95047, y / 1.0, z / 1.08883
    d = 6.0 / 29.0

    def f(t):
        return t ** (1.0 / 3.0) if t > d**3 else t / (3 * d * d) + 4.0 / 29.0

    fx, fy, fz = f(x), f(y), f(z)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def _random_ab(n=4, h=6, w=7, seed=0):
    """ab of random in-gamut colours: (n, 2, h, w) float32."""
    rgb = torch.rand(n, 3, h, w, generator=_gen(seed))
    return rgb_to_lab(rgb)[:, 1:]


# --- colour conversion -----------------------------------------------------


@pytest.mark.parametrize(
    "rgb, lab",
    [
        ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
        ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
        ((1.0, 0.0, 0.0), (53.24, 80.09, 67.20)),
        ((0.0, 1.0, 0.0), (87.73, -86.18, 83.18)),
        ((0.0, 0.0, 1.0), (32.30, 79.19, -107.86)),
    ],
)
def test_known_values(rgb, lab):
    out = rgb_to_lab(torch.tensor(rgb).view(3, 1, 1)).flatten()
    assert torch.allclose(out, torch.tensor(lab), atol=0.05), out


def test_rgb_to_lab_matches_scalar_reference():
    rgb = torch.rand(2, 3, 5, 4, generator=_gen(1), dtype=torch.float64)
    rgb[0, :, 0, 0] = torch.tensor([0.01, 0.04, 0.5])  # linear companding segment
    lab = rgb_to_lab(rgb)
    assert lab.shape == rgb.shape and lab.dtype == torch.float64
    for n in range(2):
        for i in range(5):
            for j in range(4):
                ref = _ref_rgb_to_lab(*rgb[n, :, i, j].tolist())
                assert lab[n, :, i, j].tolist() == pytest.approx(ref, abs=1e-4)
    # float32 agrees too, and leading dims are free
    lab32 = rgb_to_lab(rgb.float().unsqueeze(0))[0]
    assert torch.allclose(lab32.double(), lab, atol=1e-3)


def test_round_trip_and_gamut():
    rgb = torch.rand(3, 3, 8, 8, generator=_gen(2))
    rgb[0, :, 0, :2] = torch.tensor([[0.0, 1.0]] * 3)  # black and white
    lab = rgb_to_lab(rgb)
    assert torch.allclose(lab_to_rgb(lab, clamp=False), rgb, atol=1e-5)
    assert torch.allclose(lab_to_rgb(lab), rgb, atol=1e-5)
    assert in_gamut(lab).shape == (3, 8, 8)
    assert in_gamut(lab).all()
    outside = torch.tensor([50.0, 120.0, 120.0]).view(3, 1, 1)
    assert not in_gamut(outside).any()
    assert (lab_to_rgb(outside, clamp=False) > 1).any()
    clamped = lab_to_rgb(outside)
    assert clamped.min() >= 0 and clamped.max() <= 1


def test_conversion_gradients_are_finite():
    rgb = torch.tensor([0.0, 0.02, 0.5, 1.0]).repeat(3, 1).view(3, 2, 2).requires_grad_()
    rgb_to_lab(rgb).sum().backward()
    assert torch.isfinite(rgb.grad).all()
    lab = torch.tensor([[0.0, 50.0], [0.0, -30.0], [0.0, 20.0]]).view(3, 1, 2).requires_grad_()
    lab_to_rgb(lab, clamp=False).sum().backward()
    assert torch.isfinite(lab.grad).all()


# --- quantisation ----------------------------------------------------------


def test_bins_grid_count_and_docs():
    c = ab_bins()
    assert c.dtype == torch.float32 and c.shape[1] == 2
    documented = re.search(r"Q = (\d+)", ab_bins.__doc__)
    assert documented and len(c) == int(documented.group(1)) == 313  # the official rule is the default
    assert len(ab_bins(rule="cells")) == 262
    assert torch.equal(c, torch.round(c / GRID) * GRID)  # multiples of the grid
    keys = (c[:, 0] * 1000 + c[:, 1]).tolist()
    assert keys == sorted(keys) and len(set(keys)) == len(keys)  # sorted by a then b, unique
    c[0] = 12345.0  # a copy: the cache is untouched
    assert ab_bins()[0, 0] != 12345.0
    with pytest.raises(ValueError, match="rule"):
        ab_bins(rule="round")


def test_bins_surface_equals_full_cube():
    samples = 48
    axis = torch.linspace(0, 1, samples, dtype=torch.float64)
    cube = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij")).reshape(3, -1, 1)
    ab = rgb_to_lab(cube)[1:, :, 0]
    cells = torch.unique(torch.round(ab / GRID).t(), dim=0) * GRID
    assert torch.equal(ab_bins(samples=samples, rule="cells"), cells.float())


def _in_dilated_hull_ref(point, ab, grid):
    """Slow reference of rule ``hull``: the square [p - grid, p + grid]^2 meets the convex hull of the
    footprint iff some convex combination lies in it; tested with a linear programme."""
    from scipy.optimize import linprog

    n = ab.shape[1]
    # find lambda >= 0, sum 1, with |sum lambda_i ab_i - p| <= grid per axis
    a_ub = torch.cat([ab, -ab]).numpy()  # (4, n)
    b_ub = [point[0] + grid, point[1] + grid, grid - point[0], grid - point[1]]
    res = linprog([0.0] * n, A_ub=a_ub, b_ub=b_ub, A_eq=[[1.0] * n], b_eq=[1.0], bounds=(0, None))
    return res.status == 0


def test_bins_official_rule_count_and_known_centres():
    c = ab_bins(rule="hull")
    assert len(c) == 313  # the paper's Q (sec. 2.1) and the official fc8 num_output
    got = {tuple(int(v) for v in r) for r in c.tolist()}
    # (0, 0) (grey) and the extremes the sRGB primaries reach: green (-86, 83), magenta (98, -61),
    # blue (79, -108), yellow (-22, 94.5) lie within 10 of these lattice points
    for p in [(0, 0), (-90, 80), (100, -60), (80, -110), (-20, 100)]:
        assert p in got, p
    for p in [(-100, 80), (110, -60), (80, -120), (-20, 110), (100, 10)]:
        assert p not in got, p
    assert min(a for a, _ in got) == -90 and max(a for a, _ in got) == 100
    assert min(b for _, b in got) == -110 and max(b for _, b in got) == 100
    # the rule against a slow reference on a coarse footprint, at the lattice points near the border
    from selfsup.augment.colour import _footprint, _grid_in_dilated_hull

    ab = _footprint(24)  # (2, 3456)
    fast = {tuple(r) for r in (_grid_in_dilated_hull(ab, 10.0) * 10).tolist()}
    border = [(a, b) for a in range(-100, 111, 10) for b in range(-120, 111, 10)
              if ((a + 10, b) in fast) != ((a, b) in fast) or ((a, b + 10) in fast) != ((a, b) in fast)]
    sub = ab[:, ::8]  # a subset: its hull is inside the full one, so only "inside" answers are checked on it
    for p in border[::3]:
        if _in_dilated_hull_ref(p, sub, 10.0):
            assert p in fast, p
        if p in fast:
            assert _in_dilated_hull_ref(p, ab, 10.0), p


def test_nearest_bin_within_cell():
    c = ab_bins()
    ab = _random_ab()
    idx = nearest_bin(ab, c)
    assert idx.shape == (4, 6, 7) and idx.dtype == torch.long
    near = c[idx].permute(0, 3, 1, 2)  # (B, 2, H, W)
    dist = (near - ab).norm(dim=1)
    assert dist.max() <= GRID * math.sqrt(2) / 2 + 1e-4
    brute = (ab.permute(0, 2, 3, 1)[..., None, :] - c).norm(dim=-1).argmin(-1)
    assert torch.equal(idx, brute)


# --- soft encoding ---------------------------------------------------------


def _ref_soft_encode(ab, c, k, sigma):
    bsz, _, h, w = ab.shape
    out = torch.zeros(bsz, len(c), h, w, dtype=torch.float64)
    cs = c.double().tolist()
    for n in range(bsz):
        for i in range(h):
            for j in range(w):
                a, b = ab[n, :, i, j].double().tolist()
                d2 = sorted(((a - ca) ** 2 + (b - cb) ** 2, q) for q, (ca, cb) in enumerate(cs))[:k]
                wts = [math.exp(-d / (2 * sigma**2)) for d, _ in d2]
                for (_, q), wt in zip(d2, wts):
                    out[n, q, i, j] = wt / sum(wts)
    return out


@pytest.mark.parametrize("k, sigma", [(5, 5.0), (3, 2.0)])
def test_soft_encode(k, sigma):
    c = ab_bins()
    ab = _random_ab(n=2, h=3, w=4, seed=3)
    z = soft_encode(ab, c, k=k, sigma=sigma)
    assert z.shape == (2, len(c), 3, 4)
    assert torch.allclose(z.sum(1), torch.ones(2, 3, 4), atol=1e-6)
    assert ((z > 0).sum(1) == k).all()
    assert torch.equal(z.argmax(1), nearest_bin(ab, c))
    assert torch.allclose(z.double(), _ref_soft_encode(ab, c, k, sigma), atol=1e-5)


def test_soft_encode_chunking(monkeypatch):
    c = ab_bins()
    ab = _random_ab(n=2, h=5, w=5, seed=4)
    whole = soft_encode(ab, c)
    monkeypatch.setattr(colour, "_CHUNK", 7)  # 50 pixels in 8 chunks
    assert torch.equal(soft_encode(ab, c), whole)
    assert torch.equal(nearest_bin(ab, c), whole.argmax(1))


def test_soft_encode_far_colour_is_finite():
    c = ab_bins()
    ab = torch.tensor([1000.0, -1000.0]).view(1, 2, 1, 1)
    z = soft_encode(ab, c)
    assert torch.isfinite(z).all() and torch.allclose(z.sum(1), torch.ones(1, 1, 1))


# --- prior and rebalancing -------------------------------------------------


def test_empirical_prior_counts():
    c = ab_bins()
    ab = _random_ab(n=3, h=4, w=5, seed=5)
    counts = empirical_prior(ab, c)
    assert counts.dtype == torch.float64 and counts.shape == (len(c),)
    assert counts.sum() == 60
    assert torch.equal(counts, torch.bincount(nearest_bin(ab, c).flatten(), minlength=len(c)).double())
    # accumulation over batches equals one big batch
    assert torch.equal(empirical_prior(ab[:1], c) + empirical_prior(ab[1:], c), counts)


def test_smooth_prior():
    c = ab_bins()
    counts = torch.zeros(len(c), dtype=torch.float64)
    counts[[3, 100, 200]] = torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64)
    p = smooth_prior(counts, c)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert (p > 0).sum() > 3  # mass spread to neighbours
    assert torch.allclose(smooth_prior(counts, c, sigma=1e-3), counts / counts.sum())
    # a single bin: p~_q proportional to exp(-|c_q - c_i|^2 / (2 sigma^2))
    one = torch.zeros(len(c), dtype=torch.float64)
    one[100] = 7.0
    d2 = ((c.double() - c[100].double()) ** 2).sum(1)
    ref = torch.exp(-d2 / 50.0)
    assert torch.allclose(smooth_prior(one, c, sigma=5.0), ref / ref.sum())


def test_rebalance_weights_by_hand():
    prior = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    w = rebalance_weights(prior, lam=0.5)
    # mixture 0.5 p + 0.5 / 4 = (3/8, 11/40, 9/40, 1/8); inverses (8/3, 40/11, 40/9, 8);
    # sum p * inverse = 4/3 + 12/11 + 8/9 = 328/99
    ref = torch.tensor([8 / 3, 40 / 11, 40 / 9, 8.0], dtype=torch.float64) * 99 / 328
    assert torch.allclose(w, ref, atol=1e-12)
    assert (prior * w).sum().item() == pytest.approx(1.0, abs=1e-12)
    assert (w.diff() > 0).all()  # rarer bins weigh more
    assert torch.allclose(rebalance_weights(prior, lam=1.0), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError):
        rebalance_weights(prior, lam=1.5)


# --- loss and decoding -----------------------------------------------------


def test_colour_loss_matches_loop():
    g = _gen(6)
    bsz, q, h, w = 2, 7, 3, 4
    logits = torch.randn(bsz, q, h, w, generator=g) * 3
    target = torch.rand(bsz, q, h, w, generator=g) ** 4
    target = target / target.sum(1, keepdim=True)
    weights = torch.rand(q, generator=g) + 0.1
    total = 0.0
    for n in range(bsz):
        for i in range(h):
            for j in range(w):
                zs = logits[n, :, i, j].double().tolist()
                m = max(zs)
                lse = m + math.log(sum(math.exp(z - m) for z in zs))
                tgt = target[n, :, i, j].double().tolist()
                ce = -sum(t * (z - lse) for t, z in zip(tgt, zs))
                total += weights[max(range(q), key=lambda k: tgt[k])].item() * ce
    ref = total / (bsz * h * w)
    loss = colour_loss(logits, target, weights)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref, abs=1e-5)
    half = colour_loss(logits.to(torch.bfloat16), target, weights)
    assert half.dtype == torch.float32
    # weights matter: doubling them doubles the loss
    assert colour_loss(logits, target, 2 * weights).item() == pytest.approx(2 * ref, abs=1e-5)


def test_colour_loss_gradient_flows():
    logits = torch.randn(1, 5, 2, 2, generator=_gen(7), requires_grad=True)
    target = torch.softmax(torch.randn(1, 5, 2, 2, generator=_gen(8)), 1)
    colour_loss(logits, target, torch.ones(5)).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_annealed_mean():
    c = ab_bins()
    logits = torch.randn(2, len(c), 3, 4, generator=_gen(9)) * 2
    out = annealed_mean(logits, c)
    assert out.shape == (2, 2, 3, 4)
    plain = torch.einsum("bqhw,qc->bchw", torch.softmax(logits, 1), c)
    assert torch.allclose(annealed_mean(logits, c, T=1.0), plain, atol=1e-4)
    assert not torch.allclose(out, plain, atol=1e-2)
    # a clear mode (0.5 above the runner-up): T = 0.01 lands on its centre
    top = torch.randint(len(c), (2, 1, 3, 4), generator=_gen(10))
    logits.scatter_(1, top, logits.amax(1, keepdim=True) + 0.5)
    mode = c[top[:, 0]].permute(0, 3, 1, 2)
    assert torch.allclose(annealed_mean(logits, c, T=0.01), mode, atol=1e-3)
    assert not torch.allclose(annealed_mean(logits, c, T=1.0), mode, atol=1.0)


def test_lab_image():
    rgb = torch.rand(2, 3, 4, 4, generator=_gen(10))
    lab = rgb_to_lab(rgb)
    out = lab_image(lab[:, :1], lab[:, 1:])
    assert out.shape == (2, 3, 4, 4)
    assert torch.allclose(out, rgb, atol=1e-5)
    wild = lab_image(torch.full((1, 1, 2, 2), 50.0), torch.full((1, 2, 2, 2), 120.0))
    assert wild.min() >= 0 and wild.max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    c = ab_bins()
    ab = _random_ab(n=2, h=8, w=8, seed=11)
    z = soft_encode(ab.cuda(), c.cuda())
    assert z.is_cuda
    assert torch.allclose(z.cpu(), soft_encode(ab, c), atol=1e-5)
    logits = torch.randn(2, len(c), 8, 8, generator=_gen(12))
    w = rebalance_weights(smooth_prior(empirical_prior(ab, c), c))
    loss = colour_loss(logits.cuda(), z, w.cuda())
    assert loss.item() == pytest.approx(colour_loss(logits, soft_encode(ab, c), w).item(), abs=1e-4)
    assert torch.allclose(annealed_mean(logits.cuda(), c.cuda()).cpu(), annealed_mean(logits, c), atol=1e-3)

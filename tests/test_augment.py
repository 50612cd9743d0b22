"""selfsup.augment.batched: batched ops equal torchvision's per image, parameter distributions follow
torchvision's samplers, seeding, views, and the per-image uint8 paths."""
import math

import pytest
import torch
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from selfsup.augment import batched as A

TOL = 1e-5


def gen(seed):
    return torch.Generator().manual_seed(seed)


def images(c, b=6, h=21, w=27, seed=0):
    return torch.rand(b, c, h, w, generator=gen(seed))


def max_err(batched, per_image):
    return max((batched[i] - r).abs().max().item() for i, r in enumerate(per_image))


# ---------------------------------------------------------------------------- batched ops


# boxes (top, left, height, width) in a 21 x 27 image: whole image, corners, edges,
# smaller and larger than the output (up- and downscaling), non-square
BOXES = torch.tensor([[0, 0, 21, 27], [0, 0, 5, 4], [16, 22, 5, 5], [3, 2, 17, 9], [10, 0, 11, 27], [1, 5, 20, 20]])


@pytest.mark.parametrize("c", [3, 1])
@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("size", [8, 32, (12, 20)])
def test_resized_crop_matches_torchvision(c, antialias, size):
    x = images(c)
    y = A.resized_crop(x, BOXES, size, antialias=antialias)
    out = [size, size] if isinstance(size, int) else list(size)
    assert y.shape == (6, c, *out)
    ref = [F.resized_crop(x[i], *BOXES[i].tolist(), out, antialias=antialias) for i in range(6)]
    assert max_err(y, ref) < TOL


def test_resized_crop_antialias_matters_when_downscaling():
    x = images(3)
    big = torch.tensor([[0, 0, 21, 27]] * 6)
    down = A.resized_crop(x, big, 7, antialias=True) - A.resized_crop(x, big, 7, antialias=False)
    up = A.resized_crop(x, big, 40, antialias=True) - A.resized_crop(x, big, 40, antialias=False)
    assert down.abs().max() > 1e-2 and up.abs().max() < TOL


@pytest.mark.parametrize("c", [3, 1])
@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue"])
def test_colour_ops_match_torchvision(c, op):
    x = images(c)
    f = torch.tensor([0.0, 0.3, 0.9, 1.0, 1.4, 2.0])
    if op == "hue":
        f = torch.tensor([-0.5, -0.31, -0.02, 0.0, 0.17, 0.5])
    ours = getattr(A, f"adjust_{op}")(x, f)
    ref = [getattr(F, f"adjust_{op}")(x[i], f[i].item()) for i in range(6)]
    assert max_err(ours, ref) < TOL
    if c == 1 and op in ("saturation", "hue"):
        assert torch.equal(ours, x)  # undefined on one channel: a no-op
    elif op != "hue":
        assert not torch.allclose(ours, x)


@pytest.mark.parametrize("c", [3, 1])
@pytest.mark.parametrize("k", [3, 7])
def test_gaussian_blur_matches_torchvision(c, k):
    x = images(c)
    sigma = torch.tensor([0.1, 0.4, 0.8, 1.2, 1.7, 2.0])
    ref = [F.gaussian_blur(x[i], [k, k], [sigma[i].item()] * 2) for i in range(6)]
    assert max_err(A.gaussian_blur(x, sigma, k), ref) < TOL


@pytest.mark.parametrize("c", [3, 1])
def test_masked_ops_match_torchvision(c):
    x = images(c)
    m = torch.tensor([True, False, True, True, False, False])
    pick = lambda op: [op(x[i]) if m[i] else x[i] for i in range(6)]  # noqa: E731
    assert max_err(A.hflip(x, m), pick(F.horizontal_flip)) == 0
    assert max_err(A.solarize(x, m, 0.4), pick(lambda im: F.solarize(im, 0.4))) == 0
    assert max_err(A.grayscale(x, m), pick(lambda im: F.rgb_to_grayscale(im, c))) < TOL
    if c == 3:
        assert not torch.equal(A.grayscale(x, m)[0], x[0])


@pytest.mark.parametrize("c", [3, 1])
def test_color_jitter_matches_torchvision_per_sample_order(c):
    spec = A.ViewSpec(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.75)
    b = 32
    x = images(c, b=b)
    p = A.sample_params(spec, b, 21, 27, gen(1))
    assert 0 < int(p.jitter.sum()) < b and len({tuple(o) for o in p.order.tolist()}) > 10
    cj = v2.ColorJitter(*spec.jitter)
    ref = []
    for i in range(b):
        params = dict(fn_idx=p.order[i], brightness_factor=p.brightness[i].item(),
                      contrast_factor=p.contrast[i].item(), saturation_factor=p.saturation[i].item(),
                      hue_factor=p.hue[i].item())
        ref.append(cj.transform(x[i], params) if p.jitter[i] else x[i])
    x0 = x.clone()
    y = A.color_jitter(x, p)
    assert torch.equal(x, x0)  # the input is left alone
    assert max_err(y, ref) < TOL


def test_apply_params_matches_torchvision_chain():
    """The whole view (crop, flip, jitter, grayscale, blur, solarize) equals torchvision's
    functional ops applied one image at a time with the same drawn parameters."""
    spec = A.ViewSpec(size=16, flip_p=0.5, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.3,
                      blur_p=0.5, solarize_p=0.3)
    b = 24
    x = images(3, b=b, h=30, w=26, seed=3)
    p = A.sample_params(spec, b, 30, 26, gen(5))
    y = A.apply_params(x, spec, p)
    assert y.shape == (b, 3, 16, 16)
    k = spec.kernel_size(30, 26)
    cj = v2.ColorJitter(*spec.jitter)
    ref = []
    for i in range(b):
        im = F.resized_crop(x[i], *p.boxes[i].tolist(), [16, 16], antialias=True)
        if p.flip[i]:
            im = F.horizontal_flip(im)
        if p.jitter[i]:
            im = cj.transform(im, dict(fn_idx=p.order[i], brightness_factor=p.brightness[i].item(),
                                       contrast_factor=p.contrast[i].item(),
                                       saturation_factor=p.saturation[i].item(), hue_factor=p.hue[i].item()))
        if p.grayscale[i]:
            im = F.rgb_to_grayscale(im, 3)
        if p.blur[i]:
            im = F.gaussian_blur(im, [k, k], [p.sigma[i].item()] * 2)
        if p.solarize[i]:
            im = F.solarize(im, spec.solarize_threshold)
        ref.append(im)
    for name in ("flip", "jitter", "grayscale", "blur", "solarize"):  # every op was exercised
        assert 0 < int(getattr(p, name).sum()) < b, name
    assert max_err(y, ref) < TOL


# ---------------------------------------------------------------------------- sampling


def torchvision_boxes(n, h, w, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), seed=0):
    t = v2.RandomResizedCrop(8, scale=scale, ratio=ratio)
    img = torch.empty(1, h, w)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ps = [t.make_params([img]) for _ in range(n)]
    return torch.tensor([[p["top"], p["left"], p["height"], p["width"]] for p in ps])


def ks_p(a, b):
    return stats.ks_2samp(a.double().numpy(), b.double().numpy()).pvalue


@pytest.mark.parametrize("hw", [(32, 32), (100, 60)])
def test_crop_boxes_follow_torchvision(hw):
    h, w = hw
    n = 20000
    ref = torchvision_boxes(n, h, w)
    ours = A.sample_crop_boxes(n, h, w, (0.08, 1.0), (3 / 4, 4 / 3), gen(1))
    assert ours.shape == (n, 4) and ours.dtype == torch.int64
    top, left, bh, bw = ours.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (bh > 0).all() and (bw > 0).all()
    assert (top + bh <= h).all() and (left + bw <= w).all()
    area = lambda z: z[:, 2] * z[:, 3] / (h * w)  # noqa: E731
    aspect = lambda z: z[:, 3] / z[:, 2]  # noqa: E731
    # fixed seeds: deterministic; a wrong sampler (e.g. uniform instead of log-uniform aspect,
    # no retries) gives p < 1e-40 at this n
    assert ks_p(area(ours), area(ref)) > 1e-3
    assert ks_p(aspect(ours), aspect(ref)) > 1e-3
    assert ks_p(top / (h - bh + 1), ref[:, 0] / (h - ref[:, 2] + 1)) > 1e-3


def test_crop_fallback_frequency_matches_torchvision():
    """A 40 x 200 image: ~22 % of draws find no fitting crop in 10 attempts and fall back to the
    central crop with the aspect clamped to 4/3 (40 x 53 at left 73)."""
    h, w, n = 40, 200, 20000
    ref = torchvision_boxes(n, h, w, seed=2)
    ours = A.sample_crop_boxes(n, h, w, (0.08, 1.0), (3 / 4, 4 / 3), gen(3))
    fallback = torch.tensor([0, 73, 40, 53])
    fr, fo = ((z == fallback).all(1).double().mean().item() for z in (ref, ours))
    assert 0.15 < fr < 0.3
    assert abs(fr - fo) < 5 * math.sqrt(2 * fr * (1 - fr) / n)
    assert ks_p(ours[:, 2] * ours[:, 3], ref[:, 2] * ref[:, 3]) > 1e-3
    # an image too flat for any crop: always the fallback
    assert (A.sample_crop_boxes(100, 4, 400, (0.08, 1.0), (3 / 4, 4 / 3), gen(0)) ==
            torch.tensor([0, 197, 4, 5])).all()


def test_jitter_factors_orders_and_masks():
    n = 20000
    spec = A.ViewSpec(flip_p=0.5, jitter=(0.4, 0.3, 1.5, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5,
                      blur_sigma=(0.1, 2.0), solarize_p=0.1)
    p = A.sample_params(spec, n, 16, 16, gen(7))
    for f, lo, hi in [(p.brightness, 0.6, 1.4), (p.contrast, 0.7, 1.3), (p.saturation, 0.0, 2.5),
                      (p.hue, -0.1, 0.1), (p.sigma, 0.1, 2.0)]:
        assert f.shape == (n,) and (f >= lo).all() and (f <= hi).all()
        assert stats.kstest(f.double().numpy(), "uniform", args=(lo, hi - lo)).pvalue > 1e-3
    orders = [tuple(o) for o in p.order.tolist()]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    counts = torch.tensor([orders.count(o) for o in set(orders)], dtype=torch.float64)
    assert len(counts) == 24
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    for mask, prob in [(p.flip, 0.5), (p.jitter, 0.8), (p.grayscale, 0.2), (p.blur, 0.5), (p.solarize, 0.1)]:
        assert mask.dtype == torch.bool
        assert abs(mask.double().mean().item() - prob) < 5 * math.sqrt(prob * (1 - prob) / n)
    off = A.sample_params(A.ViewSpec(jitter=(0.4, 0.0, 0.0, 0.0)), 8, 16, 16, gen(7))
    assert off.brightness is not None and off.contrast is None and off.saturation is None and off.hue is None
    assert not A.sample_params(A.ViewSpec(), 100, 16, 16, gen(7)).jitter.any()  # no jitter configured


# ---------------------------------------------------------------------------- views


MEAN3, STD3 = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
SIMCLR = A.ViewSpec(count=2, size=16, flip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1), grayscale_p=0.2, blur_p=0.5)


def uint8_batch(c=3, b=8, h=20, w=20, seed=0):
    return torch.randint(0, 256, (b, c, h, w), generator=gen(seed), dtype=torch.uint8)


def test_augment_seeded():
    x = uint8_batch()
    a = A.augment(x, SIMCLR, gen(11), MEAN3, STD3)
    assert a.shape == (8, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, A.augment(x, SIMCLR, gen(11), MEAN3, STD3))
    assert not torch.allclose(a, A.augment(x, SIMCLR, gen(12), MEAN3, STD3))


def test_make_views_counts_and_independence():
    x = uint8_batch()
    specs = [SIMCLR, A.ViewSpec(count=3, size=8, scale=(0.05, 0.4), flip_p=0.5)]
    views = A.make_views(x, specs, gen(0), MEAN3, STD3)
    assert [v.shape for v in views] == [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 3
    assert not torch.allclose(views[0], views[1])
    assert not torch.allclose(views[2], views[3]) and not torch.allclose(views[3], views[4])
    again = A.make_views(x, specs, gen(0), MEAN3, STD3)
    assert all(torch.equal(u, v) for u, v in zip(views, again))


@pytest.mark.parametrize("c", [3, 1])
def test_augment_identity_is_normalisation(c):
    x = uint8_batch(c=c, h=12, w=17)
    mean, std = MEAN3[:c], STD3[:c]
    y = A.augment(x, A.ViewSpec(crop=False), gen(0), mean, std)
    m = torch.tensor(mean).view(1, c, 1, 1)
    s = torch.tensor(std).view(1, c, 1, 1)
    assert y.dtype == torch.float32 and torch.equal(y, (x.float() / 255 - m) / s)
    # no crop, other size: a plain resize; size 0 with crop keeps the input's (H, W)
    assert A.augment(x, A.ViewSpec(crop=False, size=9), gen(0), mean, std).shape == (8, c, 9, 9)
    assert A.augment(x, A.ViewSpec(), gen(0), mean, std).shape == (8, c, 12, 17)
    with pytest.raises(ValueError, match="mean / std"):
        A.augment(x, A.ViewSpec(), gen(0), (0.5, 0.5), (0.2, 0.2))


def test_augment_1_channel_full_spec():
    x = uint8_batch(c=1)
    spec = A.ViewSpec(size=16, flip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=1.0, grayscale_p=1.0,
                      blur_p=0.5, solarize_p=0.5)
    y = A.augment(x, spec, gen(0), (0.5,), (0.25,))
    assert y.shape == (8, 1, 16, 16) and torch.isfinite(y).all()


def test_augment_distribution_matches_torchvision_pipeline():
    """Per-view pixel mean and std over many views of one image: ours (batched) against the
    per-image torchvision pipeline (its own RNG) with a two-sample KS test."""
    spec = A.ViewSpec(size=12, flip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1), grayscale_p=0.2, blur_p=0.5,
                      solarize_p=0.2, scale=(0.2, 1.0))
    img = uint8_batch(b=1, h=24, w=24, seed=4)[0]
    img[:, :, :8] = 0  # structure so that crop position and flip matter
    n = 600
    ours = A.augment(img.expand(n, -1, -1, -1), spec, gen(0), MEAN3, STD3)
    pipe = A.torchvision_pipeline(spec, MEAN3, STD3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = torch.stack([pipe(img) for _ in range(n)])
    assert ref.shape == ours.shape
    for stat in (lambda z: z.mean((1, 2, 3)), lambda z: z.std((1, 2, 3)), lambda z: z[:, :, :, :6].mean((1, 2, 3))):
        assert ks_p(stat(ours), stat(ref)) > 1e-3


def test_view_spec_check():
    SIMCLR.check("views.simclr")
    for bad in [dict(count=0), dict(size=-1), dict(scale=(0.0, 1.0)), dict(scale=(0.5, 0.4)),
                dict(scale=(0.1, 1.2)), dict(flip_p=1.5), dict(jitter_p=-0.1), dict(blur_p=2.0),
                dict(jitter=(0.4, -0.1, 0.4, 0.1)), dict(jitter=(0.4, 0.4, 0.4, 0.6)), dict(blur_kernel=4),
                dict(blur_sigma=(0.0, 1.0)), dict(ratio=(2.0, 1.0)), dict(solarize_threshold=1.5)]:
        with pytest.raises(ValueError, match=rf"^views\.x\.{next(iter(bad))}:"):
            A.ViewSpec(**bad).check("views.x")


def test_kernel_size_rule():
    assert A.ViewSpec(size=224).kernel_size(256, 256) == 23  # SimCLR ImageNet
    assert A.ViewSpec(size=32).kernel_size(32, 32) == 3
    assert A.ViewSpec(size=96).kernel_size(96, 96) == 9
    assert A.ViewSpec().kernel_size(40, 60) == 5  # size 0: the input's shorter side
    assert A.ViewSpec(size=224, blur_kernel=7).kernel_size(256, 256) == 7


# ---------------------------------------------------------------------------- uint8 per-image paths


def test_uint8_paths():
    img = torch.randint(0, 256, (3, 37, 61), generator=gen(0), dtype=torch.uint8)
    out = A.random_resized_crop_uint8(img, 24, (0.08, 1.0), (3 / 4, 4 / 3), gen(5))
    box = A.sample_crop_boxes(1, 37, 61, (0.08, 1.0), (3 / 4, 4 / 3), gen(5))[0].tolist()
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8
    assert torch.equal(out, F.resized_crop(img, *box, [24, 24], antialias=True))
    ev = A.resize_center_crop_uint8(img, 32, 28)
    assert ev.shape == (3, 28, 28) and ev.dtype == torch.uint8
    assert torch.equal(ev, v2.Compose([v2.Resize(32, antialias=True), v2.CenterCrop(28)])(img))

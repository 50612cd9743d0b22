"""Building blocks of colorization as a pretext task, in pure torch.

Reference: R. Zhang, P. Isola, A. A. Efros, "Colorful Image Colorization",
ECCV 2016. The network sees the lightness L of a CIE Lab image and predicts,
per pixel, a distribution Z over Q quantised ab colour bins (sec. 2.1). The
target is a soft encoding of the true ab value over its nearest bins, the loss
is a cross-entropy reweighted by the rarity of the true colour (sec. 2.2,
class rebalancing), and a point estimate is recovered with the annealed mean
of the predicted distribution (sec. 2.3).

All functions take explicit tensors and keep to their device; nothing here
holds global state except the cached bin centres of :func:`ab_bins`.

Differences from the official code (github.com/richzhang/colorization), as
far as known:

* the official network input is L centred by subtracting 50; the functions
  here return plain L in [0, 100] and leave the centring to the caller;
* the official Q = 313 bin centres are read from a file ``pts_in_hull.npy``;
  here :func:`ab_bins` computes them (rule ``hull``: the same 313 points, see
  its docstring), or the 262 cells an sRGB colour rounds into (rule ``cells``);
* the official prior comes from ImageNet, shipped as a file (``prior_probs.npy``,
  name not checked here) and smoothed on the full ab grid; here :func:`empirical_prior` counts the
  caller's data and :func:`smooth_prior` applies the same Gaussian kernel
  restricted to the in-gamut centres.

Colour space: sRGB with D65 white and the 2 degree observer, the usual
formulas (IEC 61966-2-1 companding, CIE 1976 L*a*b*).
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "rgb_to_lab",
    "lab_to_rgb",
    "in_gamut",
    "ab_bins",
    "nearest_bin",
    "soft_encode",
    "empirical_prior",
    "smooth_prior",
    "rebalance_weights",
    "annealed_mean",
    "lab_image",
]

# Linear sRGB -> XYZ (D65), rows X, Y, Z.
_RGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
# Reference white D65, 2 degree observer.
_WHITE = (0.95047, 1.0, 1.08883)
_DELTA = 6.0 / 29.0

# Rows of the (B*H*W, Q) distance matrix computed at once.
_CHUNK = 32768


def _float(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a floating tensor (integers become float32)."""
    return x if x.is_floating_point() else x.float()


def _matrix(like: torch.Tensor, inverse: bool) -> torch.Tensor:
    """The RGB->XYZ matrix (or its inverse, computed in float64) on ``like``'s device and dtype."""
    m = torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)
    if inverse:
        m = torch.linalg.inv(m)
    return m.to(device=like.device, dtype=like.dtype)


def _apply(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Multiply the 3-vectors along dim -3 of ``x`` (..., 3, H, W) by the 3x3 matrix ``m``."""
    return torch.einsum("ij,...jhw->...ihw", m, x)


def _white(like: torch.Tensor) -> torch.Tensor:
    """The D65 white as a (3, 1, 1) tensor on ``like``'s device and dtype."""
    return torch.tensor(_WHITE, device=like.device, dtype=like.dtype).view(3, 1, 1)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] to CIE Lab (D65 white, 2 degree observer).

    Args:
        rgb: (..., 3, H, W) sRGB values, channel dim -3.

    Returns:
        (..., 3, H, W) Lab: L in [0, 100], a and b roughly in [-128, 128].
        Same dtype as ``rgb`` (float32 for integer input).
    """
    rgb = _float(rgb)
    # Inverse sRGB companding; the pow branch is clamped so that it stays finite
    # (and has finite gradients) where it is not selected.
    lin = torch.where(
        rgb <= 0.04045,
        rgb / 12.92,
        ((rgb.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4,
    )
    xyz = _apply(_matrix(rgb, inverse=False), lin) / _white(rgb)
    eps = _DELTA**3
    f = torch.where(
        xyz > eps,
        xyz.clamp_min(eps) ** (1.0 / 3.0),
        xyz / (3.0 * _DELTA**2) + 4.0 / 29.0,
    )
    fx, fy, fz = f.unbind(-3)
    lab = torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=-3)
    return lab


def _lab_to_rgb_unclamped(lab: torch.Tensor) -> torch.Tensor:
    """Lab (..., 3, H, W) to sRGB without clamping (may leave [0, 1] out of gamut)."""
    lab = _float(lab)
    l, a, b = lab.unbind(-3)
    fy = (l + 16.0) / 116.0
    f = torch.stack((fy + a / 500.0, fy, fy - b / 200.0), dim=-3)
    # Inverse of f: cube above delta, linear segment below.
    xyz = torch.where(f > _DELTA, f**3, 3.0 * _DELTA**2 * (f - 4.0 / 29.0)) * _white(lab)
    lin = _apply(_matrix(lab, inverse=True), xyz)
    # sRGB companding; the linear segment also extends below 0 (out of gamut).
    return torch.where(
        lin <= 0.0031308,
        12.92 * lin,
        1.055 * lin.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055,
    )


def lab_to_rgb(lab: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """CIE Lab (D65, 2 degree observer) to sRGB, the inverse of :func:`rgb_to_lab`.

    Args:
        lab: (..., 3, H, W) Lab values, channel dim -3.
        clamp: clamp the result to [0, 1] (out-of-gamut Lab values give sRGB
            outside [0, 1] otherwise).

    Returns:
        (..., 3, H, W) sRGB, same dtype as ``lab`` (float32 for integer input).
    """
    rgb = _lab_to_rgb_unclamped(lab)
    return rgb.clamp(0.0, 1.0) if clamp else rgb


def in_gamut(lab: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Whether Lab colours are representable in sRGB.

    Args:
        lab: (..., 3, H, W) Lab values.
        tol: slack allowed outside [0, 1] for rounding.

    Returns:
        (..., H, W) bool, True where the unclamped sRGB lies in [-tol, 1 + tol]
        in all three channels.
    """
    rgb = _lab_to_rgb_unclamped(lab)
    return ((rgb >= -tol) & (rgb <= 1.0 + tol)).all(dim=-3)


def _cube_surface(samples: int) -> torch.Tensor:
    """The colours on the surface of the ``samples``^3 RGB grid: (3, 6 * samples^2, 1) float64."""
    axis = torch.linspace(0.0, 1.0, samples, dtype=torch.float64)
    u, v = torch.meshgrid(axis, axis, indexing="ij")
    faces = []
    for channel in range(3):
        for value in (0.0, 1.0):
            parts = [u, v]
            parts.insert(channel, torch.full_like(u, value))
            faces.append(torch.stack(parts).reshape(3, -1))
    return torch.cat(faces, dim=1).unsqueeze(-1)


BIN_RULES = ("hull", "cells")


def _footprint(samples: int) -> torch.Tensor:
    """The ab values of the sRGB gamut's surface (``samples`` levels per channel): (2, 6 samples^2) float64."""
    return rgb_to_lab(_cube_surface(samples))[1:, :, 0]


def _grid_in_dilated_hull(ab: torch.Tensor, grid: float) -> torch.Tensor:
    """(2, N) ab points -> (Q, 2) long grid indices of the multiples of ``grid`` whose L-infinity
    distance to the convex hull of the points is at most ``grid`` (rule ``hull`` of :func:`ab_bins`)."""
    from scipy.spatial import ConvexHull  # a dependency of the project; only needed here

    pts = ab.t().numpy()  # (N, 2)
    hull = torch.from_numpy(pts[ConvexHull(pts).vertices])  # (V, 2) float64
    # the Minkowski sum of the hull and the square [-grid, grid]^2: the hull of the shifted vertices
    square = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]], dtype=torch.float64) * grid
    grown = (hull[:, None, :] + square[None]).reshape(-1, 2).numpy()  # (4V, 2)
    poly = torch.from_numpy(grown[ConvexHull(grown).vertices])  # (W, 2), counter-clockwise
    lo = torch.floor(poly.min(0).values / grid).long()
    hi = torch.ceil(poly.max(0).values / grid).long()
    ia, ib = torch.meshgrid(torch.arange(int(lo[0]), int(hi[0]) + 1), torch.arange(int(lo[1]), int(hi[1]) + 1),
                            indexing="ij")
    cand = torch.stack((ia.flatten(), ib.flatten()), 1)  # (M, 2) long: a-major, then b
    p = cand.double() * grid  # (M, 2)
    edge = poly.roll(-1, 0) - poly  # (W, 2)
    rel = p[:, None, :] - poly[None]  # (M, W, 2)
    cross = edge[None, :, 0] * rel[..., 1] - edge[None, :, 1] * rel[..., 0]  # (M, W): >= 0 inside (ccw)
    return cand[(cross >= -1e-9).all(1)]


@functools.lru_cache(maxsize=8)
def _ab_bins_cached(grid: float, samples: int, rule: str) -> torch.Tensor:
    """Uncached worker of :func:`ab_bins` (CPU, float32)."""
    ab = _footprint(samples)  # (2, 6 S^2), float64
    if rule == "hull":
        return (_grid_in_dilated_hull(ab, grid).double() * grid).float()
    idx = torch.round(ab / grid).long()
    lo = int(idx.min())
    span = int(idx.max()) - lo + 1
    # One integer key per cell, increasing in (a, b) lexicographically, so
    # that unique() also sorts by a, then b.
    keys = torch.unique((idx[0] - lo) * span + (idx[1] - lo))
    cells = torch.stack((keys // span + lo, keys % span + lo), dim=1)
    return (cells.double() * grid).float()


def ab_bins(grid: float = 10.0, samples: int = 512, rule: str = "hull") -> torch.Tensor:
    """Centres of the quantised in-gamut ab colours (sec. 2.1: "we quantize the ab output space
    into bins with grid size 10 and keep the Q = 313 values which are in-gamut").

    Rule ``hull`` (the official set): the multiples of ``grid`` whose L-infinity distance to the
    convex hull of the sRGB gamut's ab footprint (all lightnesses) is at most ``grid``, i.e. the
    corners of every ``grid`` x ``grid`` cell of the ab lattice that the convex hull touches. At
    grid 10 it gives the official count, Q = 313 (``richzhang/colorization`` ships the points as
    ``resources/pts_in_hull.npy``, the file name's "hull"; the rule reproduces that set point for
    point, and the same 313 points for samples 64 to 1024). Its extremes follow from the sRGB
    primaries: green (a = -86.2, b = 83.2) reaches the a = -90 column, magenta (a = 98.2) the a = 100 column, blue (b = -107.9) the b = -110 row,
    yellow (b = 94.5) the b = 100 row.

    Rule ``cells`` (this project's earlier set): the ab plane is cut into square cells of side
    ``grid`` centred on the multiples of ``grid`` (a colour falls into cell
    ``round(ab / grid) * grid``); a cell is kept if a colour of the dense ``samples``^3 sRGB cube
    falls into it. Count: at grid 10, samples 512, 262 bins. Stability: the gamut
    enters cell (a, b) = (20, -80) by only 0.13 ab units, along the cube edge R = 0, B = 1 for G
    in about [0.4631, 0.4652]; samples >= 479 always hit it (samples 64, 256, 448 give 261).

    Both rules read the gamut's ab footprint from the surface of the RGB cube only: sRGB -> Lab
    maps the cube one-to-one onto the gamut solid, every line of constant ab through that solid
    ends on its surface, so the surface has the same ab footprint (checked to give the same cells
    as the whole grid for samples 64 to 448), at 6 samples^2 instead of samples^3 conversions.
    Printed by::

        python -c "from selfsup.augment.colour import ab_bins; print(len(ab_bins()))"

    Results are cached per (grid, samples, rule); each call returns a fresh copy.

    Returns:
        (Q, 2) float32 CPU tensor of (a, b) centres, sorted by a, then b.
    """
    if rule not in BIN_RULES:
        raise ValueError(f"ab_bins: rule must be one of {', '.join(BIN_RULES)}, got {rule!r}")
    return _ab_bins_cached(float(grid), int(samples), rule).clone()


def _topk_bins(ab: torch.Tensor, centres: torch.Tensor, k: int):
    """Squared distances and indices of the ``k`` nearest centres.

    Args:
        ab: (B, 2, H, W) ab values.
        centres: (Q, 2) bin centres.
        k: number of neighbours.

    Returns:
        ((B, k, H, W) squared distances, (B, k, H, W) long indices), nearest
        first. The distance matrix is built ``_CHUNK`` pixels at a time.
    """
    if ab.dim() != 4 or ab.shape[1] != 2:
        raise ValueError(f"ab must be (B, 2, H, W), got {tuple(ab.shape)}")
    if not 1 <= k <= centres.shape[0]:
        raise ValueError(f"k={k} outside [1, Q={centres.shape[0]}]")
    bsz, _, h, w = ab.shape
    ab = _float(ab)
    pts = ab.permute(0, 2, 3, 1).reshape(-1, 2)
    c = centres.to(device=ab.device, dtype=ab.dtype)
    dists, idxs = [], []
    for start in range(0, pts.shape[0], _CHUNK):
        # Exact differences (not the |x|^2 + |c|^2 - 2xc shortcut) so that ties
        # and near-ties are resolved the same way as a direct computation.
        d = torch.cdist(pts[start:start + _CHUNK], c, compute_mode="donot_use_mm_for_euclid_dist")
        dk, ik = torch.topk(d, k, dim=1, largest=False, sorted=True)
        dists.append(dk**2)
        idxs.append(ik)
    d2 = torch.cat(dists).reshape(bsz, h, w, k).permute(0, 3, 1, 2)
    idx = torch.cat(idxs).reshape(bsz, h, w, k).permute(0, 3, 1, 2)
    return d2, idx


def nearest_bin(ab: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest bin centre (hard quantisation, sec. 2.1).

    Args:
        ab: (B, 2, H, W) ab values.
        centres: (Q, 2) bin centres, e.g. :func:`ab_bins`.

    Returns:
        (B, H, W) long indices into ``centres``.
    """
    return _topk_bins(ab, centres, 1)[1][:, 0]


def soft_encode(
    ab: torch.Tensor, centres: torch.Tensor, k: int = 5, sigma: float = 5.0
) -> torch.Tensor:
    """Soft encoding of ab values over the bins (sec. 2.1, the target Z).

    The ``k`` nearest centres of each pixel get weights
    exp(-d^2 / (2 sigma^2)) (d: distance to the centre), normalised to sum to
    1; all other bins get 0. The paper uses k = 5, sigma = 5.

    Args:
        ab: (B, 2, H, W) ab values.
        centres: (Q, 2) bin centres.
        k: number of nearest centres that get weight.
        sigma: Gaussian width in ab units.

    Returns:
        (B, Q, H, W) float, non-negative, summing to 1 over dim 1.
    """
    d2, idx = _topk_bins(ab, centres, k)
    # Subtracting the nearest distance leaves the normalised weights unchanged
    # and avoids 0 / 0 for colours far from every centre.
    wts = torch.exp(-(d2 - d2[:, :1]) / (2.0 * sigma**2))
    wts = wts / wts.sum(dim=1, keepdim=True)
    bsz, _, h, w = ab.shape
    out = torch.zeros(bsz, centres.shape[0], h, w, device=wts.device, dtype=wts.dtype)
    return out.scatter_(1, idx, wts)


def empirical_prior(ab: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Counts of the nearest bins over all pixels (sec. 2.2, the empirical prior p).

    Counts, not probabilities, so that callers can sum them over batches and
    pass the total to :func:`smooth_prior`.

    Args:
        ab: (N, 2, H, W) ab values.
        centres: (Q, 2) bin centres.

    Returns:
        (Q,) float64 counts on ``ab``'s device.
    """
    idx = nearest_bin(ab, centres).flatten()
    return torch.bincount(idx, minlength=centres.shape[0]).double()


def smooth_prior(counts: torch.Tensor, centres: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """Normalise bin counts to a distribution and smooth it in ab space (sec. 2.2).

    p~_q = sum_j p_j exp(-|c_q - c_j|^2 / (2 sigma^2)), then renormalised.

    Args:
        counts: (Q,) non-negative counts (e.g. from :func:`empirical_prior`).
        centres: (Q, 2) bin centres.
        sigma: Gaussian width in ab units.

    Returns:
        (Q,) float64 distribution (sums to 1) on ``counts``' device.
    """
    counts = counts.double()
    total = counts.sum()
    if not total > 0:
        raise ValueError("counts must have a positive sum")
    p = counts / total
    # The paper smooths the empirical distribution with a Gaussian of sigma 5
    # (sec. 2.2). The official code smooths on the full ab grid; this is the
    # same kernel restricted to the in-gamut centres.
    c = centres.to(device=counts.device, dtype=torch.float64)
    d2 = (c[:, None, :] - c[None, :, :]).pow(2).sum(-1)
    kernel = torch.exp(-d2 / (2.0 * sigma**2))
    smooth = kernel @ p
    return smooth / smooth.sum()


def rebalance_weights(prior: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """Class-rebalancing weights (sec. 2.2, eq. 4).

    w proportional to ((1 - lam) * p + lam / Q)^-1, scaled so that
    sum_q p_q w_q = 1 (the expected weight under the prior is 1). The paper
    uses lam = 0.5; lam = 1 gives uniform weights 1, lam = 0 pure inverse
    frequency (infinite for empty bins).

    Args:
        prior: (Q,) distribution p (e.g. from :func:`smooth_prior`); it is
            renormalised to sum to 1 first.
        lam: weight of the uniform distribution in the mixture, in [0, 1].

    Returns:
        (Q,) weights, same dtype and device as ``prior``.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam={lam} outside [0, 1]")
    p = _float(prior)
    p = p / p.sum()
    q = p.shape[0]
    w = 1.0 / ((1.0 - lam) * p + lam / q)
    return w / (p * w).sum()


def annealed_mean(logits: torch.Tensor, centres: torch.Tensor, T: float = 0.38) -> torch.Tensor:
    """Annealed mean of the predicted colour distribution (sec. 2.3, eq. 5).

    f_T(z) = softmax(log z / T) with z = softmax(logits), then the expectation
    of the bin centres under f_T. T = 1 gives the mean, T -> 0 the mode; the
    paper uses T = 0.38.

    Args:
        logits: (B, Q, H, W) unnormalised scores.
        centres: (Q, 2) bin centres.
        T: temperature, > 0.

    Returns:
        (B, 2, H, W) ab values, float32 (float64 for float64 input).
    """
    if not T > 0:
        raise ValueError(f"T={T} must be positive")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(dtype), dim=1)
    prob = torch.softmax(logp / T, dim=1)
    c = centres.to(device=logits.device, dtype=dtype)
    return torch.einsum("bqhw,qc->bchw", prob, c)


def lab_image(l: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """RGB image from lightness and ab channels.

    Args:
        l: (B, 1, H, W) lightness L in [0, 100].
        ab: (B, 2, H, W) ab channels.

    Returns:
        (B, 3, H, W) sRGB clamped to [0, 1].
    """
    return lab_to_rgb(torch.cat((l, ab.to(l.dtype)), dim=1), clamp=True)

"""Batched, seeded data augmentation on the training device.

Why: the data loader delivers uint8 image batches (B, C, H, W); decoding and per-image
torchvision pipelines in loader workers are the bottleneck of contrastive methods (2+ views
per image, each with crop, flip, colour jitter, grayscale, blur, solarisation). Here the
whole batch is augmented at once on the device the model trains on (GPU when present, CPU
otherwise), with plain torch ops, yet every image still gets its *own* random parameters,
exactly as a per-sample torchvision pipeline would draw them.

- Parameters are drawn on the CPU from an explicit ``torch.Generator`` (never the global
  RNG), so a run is reproducible and a resumed run can re-seed the generator per step.
  They are small tensors (a few numbers per image, see ``AugParams``); the ops move them to
  the images' device. Group indices (which images get blurred, which get hue first, ...)
  are computed from the CPU copies, so no op waits on the device.
- Every batched op equals the corresponding ``torchvision.transforms.v2.functional`` op for
  the same parameters (float images in [0, 1]; tests compare them sample by sample).
- ``ViewSpec`` describes one kind of view (crop / flip / jitter / grayscale / blur /
  solarize settings); ``augment`` makes one view of a batch, ``make_views`` the views a
  method asks for. ``torchvision_pipeline`` builds the equivalent per-sample torchvision
  ``Compose`` for benchmarks and distribution tests.
- ``random_resized_crop_uint8`` / ``resize_center_crop_uint8``: per-image CPU paths for
  datasets whose images differ in size (loader workers crop them to a common size before
  batching) and for evaluation.

torchvision is imported only inside the functions that call it (~1.5 s at stage start-up over torch's:
benchmarks/imports.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as TF
from torch import Tensor

Size = Union[int, tuple[int, int]]

_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, torchvision's rgb_to_grayscale weights


# --------------------------------------------------------------------------------------------
# view specification
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewSpec:
    """One kind of augmented view a method asks for (``count`` of them per image).

    Order of the ops (``augment``): random resized crop (or plain resize when ``crop`` is
    False) -> horizontal flip (``flip_p``) -> colour jitter (``jitter`` = brightness,
    contrast, saturation, hue as torchvision's ``ColorJitter``, applied with ``jitter_p``)
    -> grayscale (``grayscale_p``) -> Gaussian blur (``blur_p``, sigma ~ U(blur_sigma),
    kernel ``blur_kernel`` or SimCLR's 10 % of the output side; ``blur_rule: pil``: PIL's) -> solarize (``solarize_p``,
    pixels >= ``solarize_threshold`` inverted) -> normalisation.

    ``antialias``: the resize of the crop uses torchvision's antialiased bilinear filter
    (``RandomResizedCrop``'s default); it differs from plain bilinear only when downscaling.
    """

    count: int = 1
    size: int = 0  # output side (square); 0: the input's (H, W)
    crop: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.0
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    jitter_p: float = 0.8
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 0  # 0: SimCLR's rule (10 % of the output side, >= 3, odd)
    # simclr: torchvision's Gaussian kernel of side blur_kernel (SimCLR's, MoCo v2's, BYOL's) | pil: PIL's
    # ImageFilter.GaussianBlur(radius=sigma), three extended box blurs with no truncation at 10 % of the
    # crop (``pil_gaussian_blur``; SwAV's PILRandomGaussianBlur, facebookresearch/swav@06b1b7c
    # src/multicropdataset.py; solo-learn's GaussianBlur)
    blur_rule: str = "simclr"
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    antialias: bool = True

    def check(self, key: str) -> None:
        """Raise ``ValueError("<key>.<field>: ...")`` for a bad value."""

        def bad(name: str, need: str) -> ValueError:
            return ValueError(f"{key}.{name}: {need}, got {getattr(self, name)!r}")

        if not isinstance(self.count, int) or self.count < 1:
            raise bad("count", "need an integer >= 1")
        if not isinstance(self.size, int) or self.size < 0:
            raise bad("size", "need an integer >= 0 (0: the input's size)")
        if len(self.scale) != 2 or not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise bad("scale", "need (lo, hi) with 0 < lo <= hi <= 1")
        if len(self.ratio) != 2 or not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise bad("ratio", "need (lo, hi) with 0 < lo <= hi")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "need a probability in [0, 1]")
        if len(self.jitter) != 4 or any(v < 0 for v in self.jitter) or self.jitter[3] > 0.5:
            raise bad("jitter", "need (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5")
        if len(self.blur_sigma) != 2 or not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise bad("blur_sigma", "need (lo, hi) with 0 < lo <= hi")
        if not isinstance(self.blur_kernel, int) or self.blur_kernel < 0 or (
            self.blur_kernel and self.blur_kernel % 2 == 0
        ):
            raise bad("blur_kernel", "need 0 (automatic) or an odd positive integer")
        if self.blur_rule not in ("simclr", "pil"):
            raise bad("blur_rule", "need simclr or pil")
        if not 0.0 <= self.solarize_threshold <= 1.0:
            raise bad("solarize_threshold", "need a value in [0, 1]")

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) of this view for (h, w) inputs."""
        return (self.size, self.size) if self.size else (h, w)

    def kernel_size(self, h: int, w: int) -> int:
        """Gaussian blur kernel side for (h, w) inputs (SimCLR's rule unless ``blur_kernel``)."""
        if self.blur_kernel:
            return self.blur_kernel
        k = max(3, int(0.1 * min(self.out_size(h, w))))
        return k if k % 2 == 1 else k + 1

    @property
    def jitter_on(self) -> bool:
        return any(v > 0 for v in self.jitter) and self.jitter_p > 0


# --------------------------------------------------------------------------------------------
# parameter sampling (CPU, explicit generator)
# --------------------------------------------------------------------------------------------


def sample_crop_boxes(
    n: int, h: int, w: int, scale: Sequence[float], ratio: Sequence[float], generator: torch.Generator
) -> Tensor:
    """(n, 4) int64 boxes (top, left, height, width): torchvision's ``RandomResizedCrop``
    parameters drawn independently for n images of size (h, w).

    Per image, as ``RandomResizedCrop.get_params``: up to 10 attempts of area = h*w*U(scale),
    aspect = exp(U(log ratio)), cw = round(sqrt(area*aspect)), ch = round(sqrt(area/aspect)),
    the first with 0 < cw <= w and 0 < ch <= h is kept and its top / left drawn uniformly;
    if none fits, the central crop of the whole image with the aspect clamped to ``ratio``.
    All 10 attempts are drawn for every image at once (vectorised; float64 arithmetic,
    round half to even as Python's ``round``).
    """
    area = float(h * w)
    u = torch.rand(n, 10, 2, generator=generator, dtype=torch.float64)  # (n, 10, 2)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])  # (n, 10)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[..., 1])  # (n, 10)
    cw = torch.round(torch.sqrt(target * aspect))  # (n, 10)
    ch = torch.round(torch.sqrt(target / aspect))  # (n, 10)
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)  # (n, 10)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # (n, 1): first fitting attempt
    hit = ok.any(dim=1)  # (n,)

    # fallback: central crop, aspect clamped (torchvision's arithmetic, Python ints)
    in_ratio = float(w) / float(h)
    if in_ratio < min(ratio):
        fw, fh = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(h * max(ratio))), h
    else:
        fw, fh = w, h

    bw = torch.where(hit, cw.gather(1, first).squeeze(1), torch.tensor(float(fw), dtype=torch.float64))
    bh = torch.where(hit, ch.gather(1, first).squeeze(1), torch.tensor(float(fh), dtype=torch.float64))
    v = torch.rand(n, 2, generator=generator, dtype=torch.float64)  # (n, 2)
    top = torch.minimum(torch.floor(v[:, 0] * (h - bh + 1)), h - bh)  # uniform in [0, h - bh]
    left = torch.minimum(torch.floor(v[:, 1] * (w - bw + 1)), w - bw)
    top = torch.where(hit, top, torch.tensor(float((h - fh) // 2), dtype=torch.float64))
    left = torch.where(hit, left, torch.tensor(float((w - fw) // 2), dtype=torch.float64))
    return torch.stack([top, left, bh, bw], dim=1).to(torch.int64)  # (n, 4)


@dataclass
class AugParams:
    """Per-image random parameters of one view of a batch of n images (CPU tensors).

    ``order[i]``: the permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue) image i
    applies its jitter in (torchvision v2 ``ColorJitter`` draws ``randperm(4)`` per call).
    A jitter factor is None where the spec leaves that op off (torchvision skips it too).
    """

    boxes: Tensor  # (n, 4) int64: top, left, height, width
    flip: Tensor  # (n,) bool
    jitter: Tensor  # (n,) bool: colour jitter applied
    brightness: Optional[Tensor]  # (n,) float32 in [max(0, 1 - b), 1 + b]
    contrast: Optional[Tensor]  # (n,) float32
    saturation: Optional[Tensor]  # (n,) float32
    hue: Optional[Tensor]  # (n,) float32 in [-h, h]
    order: Tensor  # (n, 4) int64, each row a permutation of 0..3
    grayscale: Tensor  # (n,) bool
    blur: Tensor  # (n,) bool
    sigma: Tensor  # (n,) float32 in blur_sigma
    solarize: Tensor  # (n,) bool

    def to(self, device: Union[str, torch.device]) -> "AugParams":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return AugParams(**{k: (v if v is None else v.to(device)) for k, v in moved.items()})


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)  # (n,) float32


def sample_params(spec: ViewSpec, n: int, h: int, w: int, generator: torch.Generator) -> AugParams:
    """Draw every random parameter of ``spec`` for n images of size (h, w), on the CPU.

    The draws are made in a fixed order whatever the probabilities (an op that is off still
    consumes its draws), so changing one setting does not reshuffle the others.
    """
    if generator.device.type != "cpu":
        raise ValueError(f"sample_params: need a CPU generator, got one on {generator.device}")
    boxes = sample_crop_boxes(n, h, w, spec.scale, spec.ratio, generator)  # (n, 4)
    flip = torch.rand(n, generator=generator) < spec.flip_p  # (n,)
    jitter = torch.rand(n, generator=generator) < spec.jitter_p  # (n,)
    b, c, s, hue = spec.jitter
    factors = [
        _uniform(n, max(0.0, 1.0 - v), 1.0 + v, generator) for v in (b, c, s)
    ] + [_uniform(n, -hue, hue, generator)]  # 4 x (n,)
    order = torch.rand(n, 4, generator=generator).argsort(dim=1)  # (n, 4) uniform permutations
    grayscale = torch.rand(n, generator=generator) < spec.grayscale_p
    blur = torch.rand(n, generator=generator) < spec.blur_p
    sigma = _uniform(n, spec.blur_sigma[0], spec.blur_sigma[1], generator)
    solarize = torch.rand(n, generator=generator) < spec.solarize_p
    on = [v > 0 for v in spec.jitter]
    return AugParams(
        boxes=boxes, flip=flip, jitter=jitter & any(on),
        brightness=factors[0] if on[0] else None, contrast=factors[1] if on[1] else None,
        saturation=factors[2] if on[2] else None, hue=factors[3] if on[3] else None,
        order=order, grayscale=grayscale, blur=blur, sigma=sigma, solarize=solarize,
    )


# --------------------------------------------------------------------------------------------
# batched ops on float images in [0, 1], (B, C, H, W), per-sample parameters
# --------------------------------------------------------------------------------------------


def _per_sample(v: Union[Tensor, float], x: Tensor) -> Tensor:
    """A per-sample value (B,) (or a scalar) as (B, 1, 1, 1) float on x's device."""
    t = torch.as_tensor(v, dtype=x.dtype).to(x.device)
    return t.reshape(-1, 1, 1, 1) if t.ndim else t


def _size2(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _axis_weights(start: Tensor, length: Tensor, in_size: int, out_size: int, antialias: bool) -> Tensor:
    """(B, out_size, in_size) float32 resampling matrices along one axis: row i holds the
    weights with which output pixel i mixes the input pixels of the crop
    [start, start + length) (zero outside it), as PyTorch's bilinear ``interpolate``
    (align_corners=False) of the cropped image computes them: plain (2 taps, source
    coordinate clamped at the crop's first pixel and index clamped at its last) or, with
    ``antialias``, the triangle filter widened by the downscale factor and renormalised.
    """
    dev = start.device
    start = start.to(torch.float32)[:, None, None]  # (B, 1, 1)
    length = length.to(torch.float32)[:, None, None]  # (B, 1, 1)
    scale = length / out_size  # (B, 1, 1): input px per output px
    i = torch.arange(out_size, device=dev, dtype=torch.float32)[None, :, None]  # (1, S, 1)
    j = torch.arange(in_size, device=dev, dtype=torch.float32)[None, None, :] - start  # (B, 1, N): crop coords
    if antialias:
        support = torch.where(scale >= 1.0, scale, torch.ones_like(scale))  # (B, 1, 1)
        invscale = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
        center = scale * (i + 0.5)  # (B, S, 1)
        lo = torch.trunc(center - support + 0.5).clamp(min=0.0)  # (B, S, 1) first tap
        hi = torch.minimum(torch.trunc(center + support + 0.5), length)  # (B, S, 1) one past last
        wt = (1.0 - ((j - center + 0.5) * invscale).abs()).clamp(min=0.0)  # (B, S, N)
        wt = wt * ((j >= lo) & (j < hi))
        return wt / wt.sum(dim=2, keepdim=True)
    src = (scale * (i + 0.5) - 0.5).clamp(min=0.0)  # (B, S, 1)
    i0 = torch.minimum(torch.floor(src), length - 1.0)  # (B, S, 1)
    i1 = torch.minimum(i0 + 1.0, length - 1.0)
    l1 = (src - i0).clamp(0.0, 1.0)
    wt = torch.zeros(start.shape[0], out_size, in_size, device=dev)  # (B, S, N)
    wt.scatter_add_(2, (start + i0).long(), 1.0 - l1)
    wt.scatter_add_(2, (start + i1).long(), l1)
    return wt


def resized_crop(x: Tensor, boxes: Tensor, size: Size, antialias: bool = False) -> Tensor:
    """Crop each image to its box (top, left, height, width) and resize to ``size``, bilinear.

    x (B, C, H, W) float, boxes (B, 4) int -> (B, C, S, S) (or (B, C, *size)). Equals
    ``F.resized_crop(x[i], *boxes[i], size, antialias=antialias)`` per image (boxes inside
    the image). torchvision's default ``antialias=True`` only matters when downscaling
    (crop side > output side); upscaling is the same plain bilinear either way.

    Implementation: separable resampling matrices, out = Wy @ x @ Wx^T, batched over images
    (two matmuls; the matrices are exact PyTorch ``interpolate`` weights, see
    ``_axis_weights``). ``grid_sample`` does not match: at the crop's edges it samples the
    pixels outside the crop (or pads with the image border), where ``interpolate`` of the
    cropped image clamps to the crop. Matmuls run in TF32 on CUDA only if the caller
    enabled ``torch.backends.cuda.matmul.allow_tf32`` (then ~1e-3 error instead of ~1e-6).
    """
    sh, sw = _size2(size)
    b, c, h, w = x.shape
    boxes = boxes.to(x.device)
    wy = _axis_weights(boxes[:, 0], boxes[:, 2], h, sh, antialias).to(x.dtype)  # (B, Sh, H)
    wx = _axis_weights(boxes[:, 1], boxes[:, 3], w, sw, antialias).to(x.dtype)  # (B, Sw, W)
    t = torch.matmul(x, wx.transpose(1, 2).unsqueeze(1))  # (B, C, H, Sw)
    return torch.matmul(wy.unsqueeze(1), t)  # (B, C, Sh, Sw)


def hflip(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror the images whose mask is set. x (B, C, H, W), mask (B,) bool."""
    m = mask.to(x.device).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return torch.where(m, x.flip(-1), x)


def _gray(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma, torchvision's arithmetic (same op order)."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(_GRAY[0]).add_(g, alpha=_GRAY[1]).add_(b, alpha=_GRAY[2]).unsqueeze(-3)


def _blend(x: Tensor, y: Tensor, f: Tensor) -> Tensor:
    """x * f + y * (1 - f), clamped to [0, 1] (torchvision's ``_blend``); f (B, 1, 1, 1)."""
    return (x * f + y * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, f: Union[Tensor, float]) -> Tensor:
    """x * f clamped to [0, 1]; f (B,) per image."""
    return (x * _per_sample(f, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, f: Union[Tensor, float]) -> Tensor:
    """Blend with the per-image mean of its grayscale image (the image itself for C = 1)."""
    g = _gray(x) if x.shape[-3] == 3 else x  # (B, 1, H, W)
    mean = g.mean(dim=(-3, -2, -1), keepdim=True)  # (B, 1, 1, 1)
    return _blend(x, mean, _per_sample(f, x))


def adjust_saturation(x: Tensor, f: Union[Tensor, float]) -> Tensor:
    """Blend with the grayscale image; identity on 1-channel images."""
    if x.shape[-3] == 1:
        return x
    return _blend(x, _gray(x), _per_sample(f, x))


def _rgb_to_hsv(x: Tensor) -> Tensor:
    """(B, 3, H, W) RGB -> HSV, torchvision's tensor implementation."""
    r, g, _ = x.unbind(dim=-3)
    minc, maxc = torch.aminmax(x, dim=-3)  # (B, H, W) each
    eqc = maxc == minc
    crange = maxc - minc
    ones = torch.ones_like(maxc)
    s = crange / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, crange).unsqueeze_(dim=-3)  # (B, 1, H, W)
    rc, gc, bc = ((maxc.unsqueeze(dim=-3) - x) / divisor).unbind(dim=-3)
    maxc_neq_r = maxc != r
    maxc_eq_g = maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(maxc_eq_g & maxc_neq_r)
    hr = bc.sub_(gc).mul_(~maxc_neq_r)
    hb = gc.add_(4.0).sub_(rc).mul_(maxc_neq_r.logical_and_(maxc_eq_g.logical_not_()))
    h = hr.add_(hg).add_(hb).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((h, s, maxc), dim=-3)  # (B, 3, H, W)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    """(B, 3, H, W) HSV -> RGB, torchvision's tensor implementation."""
    h, s, v = x.unbind(dim=-3)
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    i = i.to(torch.int64).remainder_(6)  # (B, H, W) sector
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=-3)  # (B, 4, H, W)
    select = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=x.device)
    select = select[:, i].movedim(0, -3)  # (B, 3, H, W): which of v, p, q, t each channel takes
    return vpqt.gather(-3, select)


def adjust_hue(x: Tensor, hf: Union[Tensor, float]) -> Tensor:
    """Rotate the hue by hf (B,) in [-0.5, 0.5] (RGB -> HSV -> RGB); identity for C = 1."""
    if x.shape[-3] == 1 or x.numel() == 0:
        return x
    hsv = _rgb_to_hsv(x)
    h, s, v = hsv.unbind(dim=-3)  # (B, H, W) each
    shift = torch.as_tensor(hf, dtype=x.dtype).to(x.device)
    if shift.ndim:
        shift = shift.view(-1, 1, 1)  # (B, 1, 1)
    h = (h + shift).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: Tensor, params: AugParams) -> Tensor:
    """torchvision's ``RandomApply([ColorJitter(...)])`` with per-image parameters.

    Images whose ``params.jitter`` is set get brightness / contrast / saturation / hue
    (those not None) in their own order ``params.order``; the others pass unchanged. For
    each of the 4 order slots, images are grouped by the op they apply in that slot, so
    each image goes through each op once (no 4x recompute). Groups are found from the CPU
    copies of the parameters (no device sync).
    """
    rgb = x.shape[-3] == 3
    factors = [params.brightness, params.contrast, params.saturation if rgb else None,
               params.hue if rgb else None]
    apply = params.jitter.cpu()  # (B,)
    order = params.order.cpu()  # (B, 4)
    if not bool(apply.any()) or all(f is None for f in factors):
        return x
    x = x.clone()
    for slot in range(4):
        for op, (fn, f) in enumerate(zip(_JITTER_OPS, factors)):
            if f is None:
                continue
            sel = (apply & (order[:, slot] == op)).nonzero().squeeze(1)  # (k,) CPU
            if sel.numel() == 0:
                continue
            idx = sel.to(x.device)
            x[idx] = fn(x[idx], f[sel.to(f.device)])
    return x


def grayscale(x: Tensor, mask: Tensor) -> Tensor:
    """Replace the images whose mask is set by their luma, kept as 3 channels; identity for C = 1."""
    if x.shape[-3] == 1:
        return x
    m = mask.to(x.device).view(-1, 1, 1, 1)
    return torch.where(m, _gray(x).expand_as(x), x)


def gaussian_kernel1d(kernel_size: int, sigma: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, k) normalised 1-D Gaussian kernels, torchvision's ``_get_gaussian_kernel1d``."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    t = torch.linspace(-lim, lim, steps=kernel_size, dtype=dtype, device=sigma.device)  # (k,)
    return torch.softmax(t.div(sigma.to(dtype)[:, None]).pow(2).neg(), dim=1)  # (B, k)


def gaussian_blur(x: Tensor, sigma: Union[Tensor, float], kernel_size: int) -> Tensor:
    """Gaussian blur with a per-image sigma (B,), as ``F.gaussian_blur(img, [k, k], [s, s])``:
    torchvision's kernel and reflect padding, done as two 1-D depthwise convolutions
    (separable: the 2-D kernel is the outer product of the 1-D ones)."""
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"gaussian_blur: kernel_size must be odd and positive, got {kernel_size}")
    b, c, h, w = x.shape
    sig = torch.as_tensor(sigma, dtype=x.dtype).to(x.device).reshape(-1).expand(b)  # (B,)
    k1 = gaussian_kernel1d(kernel_size, sig, x.dtype).repeat_interleave(c, dim=0)  # (B*C, k)
    p = kernel_size // 2
    y = TF.pad(x, (p, p, p, p), mode="reflect").reshape(1, b * c, h + 2 * p, w + 2 * p)
    y = TF.conv2d(y, k1.view(b * c, 1, 1, kernel_size), groups=b * c)  # (1, B*C, H+2p, W)
    y = TF.conv2d(y, k1.view(b * c, 1, kernel_size, 1), groups=b * c)  # (1, B*C, H, W)
    return y.view(b, c, h, w)


def pil_box_radius(sigma: Tensor, passes: int = 3) -> Tensor:
    """(B,) sigmas -> (B,) float64 extended box radii l + a whose ``passes``-fold box blur has variance
    sigma^2 (Gwosdek et al. 2011, eqs. 7, 11, 14), as Pillow's ``_gaussian_blur_radius`` (BoxBlur.c)
    turns ``ImageFilter.GaussianBlur(radius=sigma)`` into box blurs."""
    s2 = sigma.double() ** 2 / passes
    big_l = torch.sqrt(12.0 * s2 + 1.0)  # the ideal box length
    l = torch.floor((big_l - 1.0) / 2.0)  # its integer radius
    a = (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - (l + 1) ** 2))  # the fractional part
    return l + a


def pil_gaussian_blur(x: Tensor, sigma: Union[Tensor, float], passes: int = 3) -> Tensor:
    """PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` per image, (B, C, H, W) floats -> the same shape:
    ``passes`` extended box blurs along the width, then along the height (Pillow's ``ImagingBoxBlur``),
    each of radius r = ``pil_box_radius(sigma)``: the 2 floor(r) + 1 central taps 1 / (2 r + 1) and the
    two taps beyond them (r - floor(r)) / (2 r + 1), the edge pixels repeated beyond the border. No
    kernel truncation: the support grows with sigma whatever the crop's side. Pillow rounds each pass
    to 8 bits; here the passes stay in floating point."""
    b, c, h, w = x.shape
    sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(b)  # (B,)
    r = pil_box_radius(sig)  # (B,)
    l = torch.floor(r)
    half = int(l.max().item()) + 1  # the widest kernel's half side, fractional tap included
    d = torch.arange(-half, half + 1, dtype=torch.float64).abs()[None]  # (1, K)
    inner = 1.0 / (2 * r + 1)  # (B,)
    k1 = torch.where(d <= l[:, None], inner[:, None], torch.where(d == l[:, None] + 1, ((r - l) * inner)[:, None],
                                                                   torch.zeros_like(d)))  # (B, K)
    k1 = k1.to(x.dtype).to(x.device).repeat_interleave(c, dim=0)  # (B*C, K)
    k = k1.shape[1]
    y = x.reshape(1, b * c, h, w)
    for _ in range(passes):  # along the width, edges repeated
        y = TF.conv2d(TF.pad(y, (half, half, 0, 0), mode="replicate"), k1.view(b * c, 1, 1, k), groups=b * c)
    for _ in range(passes):  # along the height
        y = TF.conv2d(TF.pad(y, (0, 0, half, half), mode="replicate"), k1.view(b * c, 1, k, 1), groups=b * c)
    return y.view(b, c, h, w)


class _PilBlur(torch.nn.Module):
    """``torchvision_pipeline``'s step for ``blur_rule: pil``: with probability p, ``pil_gaussian_blur`` with
    sigma ~ U(lo, hi) (SwAV's PILRandomGaussianBlur), on a float (C, H, W) image."""

    def __init__(self, p: float, sigma: tuple[float, float]):
        super().__init__()
        self.p, self.sigma = p, sigma

    def forward(self, img: Tensor) -> Tensor:
        if float(torch.rand(())) >= self.p:
            return img
        s = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * float(torch.rand(()))
        return pil_gaussian_blur(img[None], s)[0]


def solarize(x: Tensor, mask: Tensor, threshold: float = 0.5) -> Tensor:
    """Invert (1 - x) the pixels >= threshold of the images whose mask is set."""
    m = mask.to(x.device).view(-1, 1, 1, 1)
    return torch.where(m & (x >= threshold), 1.0 - x, x)


# --------------------------------------------------------------------------------------------
# views
# --------------------------------------------------------------------------------------------


def _to_float(x: Tensor) -> Tensor:
    return x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)


def _normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    c = x.shape[-3]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"augment: need one mean / std per channel ({c}), got {list(mean)} / {list(std)}")
    m = torch.tensor(list(mean), dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    s = torch.tensor(list(std), dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    return (x - m) / s


def apply_params(x: Tensor, spec: ViewSpec, params: AugParams) -> Tensor:
    """Apply ``spec``'s ops with the drawn ``params`` to float images (B, C, H, W) in [0, 1]."""
    b, c, h, w = x.shape
    out = spec.out_size(h, w)
    if spec.crop:
        x = resized_crop(x, params.boxes, out, antialias=spec.antialias)  # (B, C, *out)
    elif out != (h, w):
        full = torch.tensor([[0, 0, h, w]], dtype=torch.int64).expand(b, 4)
        x = resized_crop(x, full, out, antialias=spec.antialias)
    if spec.flip_p > 0:
        x = hflip(x, params.flip)
    if spec.jitter_on:
        x = color_jitter(x, params)
    if spec.grayscale_p > 0 and c == 3:
        x = grayscale(x, params.grayscale)
    if spec.blur_p > 0:
        sel = params.blur.cpu().nonzero().squeeze(1)  # (k,) CPU: the blurred images
        if sel.numel():
            idx = sel.to(x.device)
            x = x.clone()
            if spec.blur_rule == "pil":
                x[idx] = pil_gaussian_blur(x[idx], params.sigma.cpu()[sel])
            else:
                x[idx] = gaussian_blur(x[idx], params.sigma.cpu()[sel], spec.kernel_size(h, w))
    if spec.solarize_p > 0:
        x = solarize(x, params.solarize, spec.solarize_threshold)
    return x


def augment(
    x: Tensor, spec: ViewSpec, generator: torch.Generator, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """One augmented view of a uint8 batch (B, C, H, W) -> float32 (B, C, S, S), normalised.

    Converts to float [0, 1] on x's device (x / 255, as ``EvalTransform``), draws the
    parameters on the CPU from ``generator`` (``sample_params``), then applies crop -> flip
    -> colour jitter -> grayscale -> blur -> solarize on x's device and normalises with the
    per-channel ``mean`` / ``std``. Flip commutes with the pointwise colour ops and with the
    symmetric Gaussian blur, so this fixed order has the same distribution as MoCo v2's /
    SimCLR's / BYOL's torchvision pipelines (crop, flip, jitter, grayscale, blur, solarize).
    """
    spec.check("view")
    b, c, h, w = x.shape
    params = sample_params(spec, b, h, w, generator)
    return _normalize(apply_params(_to_float(x), spec, params), mean, std)


def make_views(
    x: Tensor, specs: Sequence[ViewSpec], generator: torch.Generator, mean: Sequence[float],
    std: Sequence[float],
) -> list[Tensor]:
    """For each spec in order, ``spec.count`` independently augmented views of x (a flat list)."""
    xf = _to_float(x)
    views = []
    for spec in specs:
        spec.check("view")
        b, c, h, w = xf.shape
        for _ in range(spec.count):
            params = sample_params(spec, b, h, w, generator)
            views.append(_normalize(apply_params(xf, spec, params), mean, std))
    return views


# --------------------------------------------------------------------------------------------
# per-image CPU paths (images of different sizes; evaluation)
# --------------------------------------------------------------------------------------------


def random_resized_crop_uint8(
    img: Tensor, size: int, scale: Sequence[float], ratio: Sequence[float], generator: torch.Generator
) -> Tensor:
    """uint8 (C, H, W) -> (C, size, size): a random resized crop (antialiased bilinear, as
    ``RandomResizedCrop``), its box from ``sample_crop_boxes(1, ...)``; for loader workers
    bringing images of different sizes to a common one before batching."""
    from torchvision.transforms.v2 import functional as F  # lazy: see module docstring

    top, left, h, w = sample_crop_boxes(1, img.shape[-2], img.shape[-1], scale, ratio, generator)[0].tolist()
    return F.resized_crop(img, top, left, h, w, [size, size], antialias=True)


def resize_center_crop_uint8(img: Tensor, resize: int, crop: int) -> Tensor:
    """uint8 (C, H, W) -> (C, crop, crop): shorter side resized to ``resize`` (antialiased
    bilinear), then the central ``crop`` x ``crop`` (the ImageNet eval path: 256 / 224)."""
    from torchvision.transforms.v2 import functional as F

    return F.center_crop(F.resize(img, [resize], antialias=True), [crop, crop])


def torchvision_pipeline(
    spec: ViewSpec, mean: Sequence[float], std: Sequence[float], image_size: Optional[tuple[int, int]] = None
) -> Any:
    """The per-image torchvision v2 ``Compose`` equivalent to ``augment(..., spec, ...)``.

    Takes a uint8 (C, H, W) image; converts to float first (as ``augment``, so both resize
    and colour ops work on floats). ``image_size`` (H, W) is needed when ``spec.size`` is 0
    and the view crops, resizes or blurs (the output size is then the input's).
    """
    from torchvision.transforms import v2

    spec.check("view")
    if spec.size:
        out = (spec.size, spec.size)
    elif image_size is not None:
        out = (int(image_size[0]), int(image_size[1]))
    elif spec.crop or spec.blur_p > 0:
        raise ValueError("torchvision_pipeline: spec.size is 0, pass image_size")
    else:
        out = None
    rgb = len(mean) == 3
    ops: list[Any] = [v2.ToDtype(torch.float32, scale=True)]
    if spec.crop:
        ops.append(v2.RandomResizedCrop(list(out), scale=spec.scale, ratio=spec.ratio, antialias=spec.antialias))
    elif spec.size:
        ops.append(v2.Resize(list(out), antialias=spec.antialias))
    if spec.flip_p > 0:
        ops.append(v2.RandomHorizontalFlip(spec.flip_p))
    b, c, s, h = spec.jitter
    if spec.jitter_on:
        ops.append(v2.RandomApply([v2.ColorJitter(b, c, s if rgb else 0.0, h if rgb else 0.0)], p=spec.jitter_p))
    if spec.grayscale_p > 0 and rgb:
        ops.append(v2.RandomGrayscale(spec.grayscale_p))
    if spec.blur_p > 0 and spec.blur_rule == "pil":
        ops.append(_PilBlur(spec.blur_p, tuple(spec.blur_sigma)))
    elif spec.blur_p > 0:
        k = spec.kernel_size(*out)
        ops.append(v2.RandomApply([v2.GaussianBlur(k, sigma=spec.blur_sigma)], p=spec.blur_p))
    if spec.solarize_p > 0:
        ops.append(v2.RandomSolarize(spec.solarize_threshold, p=spec.solarize_p))
    ops.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(ops)


def view_spec(c: Any, count: int = 1) -> ViewSpec:
    """The view a ``TrainCfg`` describes (``augment``, ``crop_scale``, ``jitter``, ...); size 0 = the
    dataset's (native for arrays, ``dataset.crop_size`` for image files)."""
    return ViewSpec(count=count, size=0, crop=c.augment != "none", scale=tuple(c.crop_scale),
                    flip_p=0.5 if c.augment == "crop_flip" else 0.0, jitter=tuple(c.jitter), jitter_p=c.jitter_p,
                    grayscale_p=c.grayscale_p, blur_p=c.blur_p, solarize_p=getattr(c, "solarize_p", 0.0))

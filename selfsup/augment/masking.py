"""Patch masks of masked image modelling, on an h x w grid of patches, seeded by a torch.Generator.

- ``random_mask`` (MAE, He et al. 2022, sec. 3 "Masking"): per image, a uniformly random subset of
  ``ratio`` of the patches is masked (75 %); the official ``random_masking`` sorts per-sample noise, keeps
  the first ``int(N (1 - ratio))`` and returns the indices that restore the order. The encoder sees only
  the kept patches.
- ``block_mask`` (BEiT, Bao et al. 2022, sec. 2.5 and Algorithm 1): blocks of at least ``min_block``
  patches (16 for 14 x 14) with a random aspect ratio in [0.3, 1/0.3] (drawn log-uniformly, as the
  official ``MaskingGenerator``) are added until about ``ratio`` (40 %) of the patches are masked. As the
  official generator, a block may only add up to the patches still missing (the paper's Algorithm 1
  stops once the mask exceeds the target: the code hits it exactly when it can) and each block gets 10
  placement attempts. ``fill``: "official" is microsoft/unilm@768a3c8 ``beit/masking_generator.py`` try
  for try: the area ~ U(min_block, patches still missing) (an interval that runs backwards once fewer
  than min_block are missing), sides strictly smaller than the grid's, and the mask is returned as it
  is when ten tries add nothing (a little short of the target: 74.5 of 75 patches on average at
  14 x 14); "complete" (this project's earlier rule) draws the area in [min_block, max(min_block,
  missing)], lets a block span the grid, and where no block fits halves the minimum block size and
  goes on, so every mask reaches the target count.
"""
from __future__ import annotations

import math

import torch


def random_mask(batch: int, n: int, ratio: float, g: torch.Generator, device: torch.device | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_keep (B, K), mask (B, N) 1 = masked, ids_restore (B, N)) with K = int(N (1 - ratio))."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    keep = int(n * (1 - ratio))
    noise = torch.rand(batch, n, generator=g)  # (B, N): ascending noise is kept
    ids_shuffle = noise.argsort(1)
    ids_restore = ids_shuffle.argsort(1)
    mask = torch.ones(batch, n)
    mask[:, :keep] = 0
    mask = mask.gather(1, ids_restore)  # (B, N) in the patches' order
    out = ids_shuffle[:, :keep], mask, ids_restore
    return tuple(t.to(device) for t in out) if device is not None else out  # type: ignore[return-value]


def draw_block(h: int, w: int, lo: float, hi: float, min_aspect: float, g: torch.Generator
               ) -> tuple[int, int, int, int] | None:
    """One candidate block (top, left, height, width) on an h x w grid: area s ~ U(lo, hi) patches,
    aspect r with log r ~ U(log min_aspect, -log min_aspect), sides round(sqrt(s r)) x round(sqrt(s / r))
    (BEiT Algorithm 1; official ``MaskingGenerator._mask``); None if it does not fit the grid."""
    s = lo + (hi - lo) * float(torch.rand((), generator=g))
    a, b = math.log(min_aspect), -math.log(min_aspect)
    r = math.exp(a + (b - a) * float(torch.rand((), generator=g)))
    bh, bw = int(round(math.sqrt(s * r))), int(round(math.sqrt(s / r)))
    if not (0 < bh <= h and 0 < bw <= w):
        return None
    top = int(torch.randint(0, h - bh + 1, (), generator=g))
    left = int(torch.randint(0, w - bw + 1, (), generator=g))
    return top, left, bh, bw


FILLS = ("official", "complete")


def official_block(mask: torch.Tensor, max_patches: int, min_block: int, min_aspect: float,
                   g: torch.Generator) -> int:
    """One block of the official ``MaskingGenerator._mask`` on ``mask`` (h, w) bool, in place: up to 10
    tries, each drawing the area s ~ U(min_block, max_patches) (a + (b - a) u, also when b < a), log
    aspect ~ U(log min_aspect, -log min_aspect), sides round(sqrt(s r)) x round(sqrt(s / r)); a block
    strictly smaller than the grid on both sides, at a uniform position (both ends included), is kept
    when it adds between 1 and ``max_patches`` new patches. Returns the patches it added (0: none fit)."""
    h, w = mask.shape
    la, lb = math.log(min_aspect), -math.log(min_aspect)
    for _ in range(10):
        s = min_block + (max_patches - min_block) * float(torch.rand((), generator=g))
        r = math.exp(la + (lb - la) * float(torch.rand((), generator=g)))
        bh, bw = int(round(math.sqrt(s * r))), int(round(math.sqrt(s / r)))
        if bw < w and bh < h:
            top = int(torch.randint(0, h - bh + 1, (), generator=g))
            left = int(torch.randint(0, w - bw + 1, (), generator=g))
            block = mask[top:top + bh, left:left + bw]
            new = bh * bw - int(block.sum())
            if 0 < new <= max_patches:
                block[:] = True
                return new
    return 0


def block_mask(h: int, w: int, ratio: float, g: torch.Generator, min_block: int = 16,
               min_aspect: float = 0.3, fill: str = "official") -> torch.Tensor:
    """(h, w) bool mask with up to round(ratio h w) patches masked in blocks (BEiT); ``fill``: see the
    module docstring."""
    target = int(round(ratio * h * w))
    if not 0 < target <= h * w:
        raise ValueError(f"block mask: ratio {ratio} of {h}x{w} patches masks none or too many")
    if not 0.0 < min_aspect <= 1.0:
        raise ValueError(f"block mask: min_aspect must be in (0, 1], got {min_aspect}")
    if fill not in FILLS:
        raise ValueError(f"block mask: fill must be one of {FILLS}, got {fill!r}")
    if fill == "official":
        mask = torch.zeros(h, w, dtype=torch.bool)
        count = 0
        while count < target:
            delta = official_block(mask, target - count, min_block, min_aspect, g)
            if delta == 0:
                break  # official: no block fits, the mask stays short of the target
            count += delta
        return mask
    lo = min(min_block, target)
    mask = torch.zeros(h, w, dtype=torch.bool)
    count = 0
    while count < target:
        left = target - count
        delta = 0
        for _ in range(10):  # official: 10 attempts per block
            box = draw_block(h, w, lo, max(lo, left), min_aspect, g)
            if box is None:
                continue
            t, l_, bh, bw = box
            block = mask[t:t + bh, l_:l_ + bw]
            new = int((~block).sum())
            if 0 < new <= left:  # a block adds only up to the patches still missing (official)
                block[:] = True
                delta = new
                break
        if delta == 0:
            if lo == 1:
                break  # no block fits any more
            # official: stop here (the mask may end below the target); we halve the minimum block
            # instead, so a small grid (digits' 4 x 4) reaches its ratio too
            lo = max(1, lo // 2)
            continue
        count += delta
    return mask


def block_masks(batch: int, h: int, w: int, ratio: float, g: torch.Generator, min_block: int = 16,
                min_aspect: float = 0.3, fill: str = "official") -> torch.Tensor:
    """(B, h w) bool: one ``block_mask`` per image, flattened in the patches' row-major order."""
    return torch.stack([block_mask(h, w, ratio, g, min_block, min_aspect, fill).flatten() for _ in range(batch)])


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p p C): non-overlapping p x p patches, row-major (MAE's ``patchify``)."""
    b, c, hh, ww = x.shape
    h, w = hh // p, ww // p
    x = x[:, :, :h * p, :w * p].reshape(b, c, h, p, w, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, h * w, p * p * c)


def unpatchify(t: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``patchify``: (B, h w, p p C) -> (B, C, h p, w p)."""
    b = t.shape[0]
    x = t.reshape(b, h, w, p, p, c)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, h * p, w * p)

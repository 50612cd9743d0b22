"""Colourisation's loss (Zhang et al., ECCV 2016, sec. 2.2, eq. 2): the cross-entropy against the
soft-encoded ab target, reweighted per pixel by the rarity of its colour (class rebalancing).
The bins, the soft encoding and the weights are in ``selfsup/augment/colour.py``."""
from __future__ import annotations

import torch


def colour_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Class-rebalanced multinomial cross-entropy (sec. 2.1, eq. 2; weights sec. 2.2).

    Per pixel: v(Z) * (-sum_q Z_q log softmax(logits)_q) with
    v(Z) = weights[argmax_q Z] (eq. 3). The paper sums over pixels; here the
    loss is averaged over all B * h * w pixels, which only rescales the
    learning rate. Computed in float32 (or float64 for float64 input).

    Args:
        logits: (B, Q, h, w) unnormalised scores.
        target: (B, Q, h, w) soft encoding Z (e.g. :func:`soft_encode`).
        weights: (Q,) rebalancing weights (e.g. :func:`rebalance_weights`).
        mask: optional (B,) per-image factor on the weights (the official NonGrayMaskLayer's 0 for
            grayscale images); masked pixels still count in the mean.

    Returns:
        Scalar loss.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(dtype), dim=1)
    z = target.to(dtype)
    ce = -(z * logp).sum(dim=1)  # (B, h, w)
    v = weights.to(device=logits.device, dtype=dtype)[z.argmax(dim=1)]  # (B, h, w)
    if mask is not None:
        v = v * mask.to(device=logits.device, dtype=dtype).view(-1, 1, 1)
    return (v * ce).mean()

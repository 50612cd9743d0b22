"""MAE's reconstruction loss (He et al., CVPR 2022, sec. 3; official ``models_mae.py``,
``forward_loss``): the mean squared error on the masked patches only, optionally against
per-patch normalised pixels."""
from __future__ import annotations

import torch


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error; ``pred`` / ``target`` (B, N, p p C),
    ``mask`` (B, N) 1 = masked. ``norm_pix``: the target normalised per patch, (t - mean) / sqrt(var + 1e-6)
    (unbiased variance, as torch's ``var`` in the official code)."""
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)  # (B, N)
    return (per_patch * mask).sum() / mask.sum()

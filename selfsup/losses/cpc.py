"""CPC's InfoNCE over a grid of patch embeddings (van den Oord et al. 2018, sec. 2.3, Eq. 4; for images
Hénaff et al. 2020, sec. 3 and the appendix's pseudocode), a pure function.

The context at row i of image b predicts the target embedding at row i + k of the same column; the
candidates are the targets of every location of every image of the batch (the other locations of the
same image and all locations of the other images are the negatives, sec. 3 of Hénaff et al.), a
softmax over them with the prediction's dot products as logits (no temperature: the predictions are
scaled by ``emb_scale`` instead, 0.1 in the pseudocode). The loss is the mean over the predicted
locations.

Several processes (``gather``): the candidates are the targets of every rank's batch, gathered with
their gradient (``selfsup.core.dist.all_gather_grad``), and each label is offset by the rank's block;
with DDP averaging the gradients this is the loss of the global batch (at world size 1 it is the
one-process loss exactly).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.core import dist


def cpc_candidates(targets: torch.Tensor, gather: bool) -> tuple[torch.Tensor, int]:
    """targets: (B, H, W, T) -> ((N, T) every candidate row, in (rank, image, row, column) order; the
    index of this rank's first row among them)."""
    flat = targets.reshape(-1, targets.shape[-1])  # (B H W, T)
    if not gather or dist.world() == 1:
        return flat, 0
    return dist.all_gather_grad(flat), dist.rank() * len(flat)


def cpc_infonce(pred: torch.Tensor, targets: torch.Tensor, k: int, candidates: torch.Tensor | None = None,
                start: int = 0) -> torch.Tensor:
    """pred: (B, H - k, W, T) the predictions of rows k..H-1 made from the contexts at rows 0..H-k-1;
    targets: (B, H, W, T); candidates: (N, T) the rows the softmax runs over (default: ``targets``
    flattened in (image, row, column) order) and ``start`` the index of this batch's first target
    among them. Returns the mean cross-entropy of the true target among the candidates."""
    b, h, w, t = targets.shape
    if pred.shape != (b, h - k, w, t):
        raise ValueError(f"cpc_infonce: predictions of shape {tuple(pred.shape)} for offset {k} of a "
                         f"{h} x {w} grid, expected {(b, h - k, w, t)}")
    cand = targets.reshape(-1, t) if candidates is None else candidates  # (N, T)
    logits = pred.reshape(-1, t).float() @ cand.float().t()  # (B (H - k) W, N)
    img = torch.arange(b, device=pred.device)[:, None, None]
    row = torch.arange(h - k, device=pred.device)[None, :, None]
    col = torch.arange(w, device=pred.device)[None, None, :]
    label = (start + img * h * w + (row + k) * w + col).reshape(-1)  # (B (H - k) W,)
    return F.cross_entropy(logits, label)

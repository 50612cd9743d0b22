"""Losses over prototype scores: SwAV's swapped prediction (Caron et al., NeurIPS 2020, eq. 1 and
the multi-crop eq. 4) and DeepCluster-v2's cross-entropy against k-means ids (official
``main_deepclusterv2.py``), both averaged over the crops as the official code."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swav_loss(scores: torch.Tensor, codes: torch.Tensor, crops_for_assign: list[int],
              temperature: float = 0.1) -> torch.Tensor:
    """The swapped prediction loss (eq. 1, multi-crop eq. 4, averaged as the official code).

    scores: (V, B, K) prototype scores of every crop (with gradient); codes: (A, B, K) the codes
    of the A crops in ``crops_for_assign`` (constants). For each assigned crop i: the mean over the
    other crops v != i of the batch mean of -sum_k q_i log softmax(scores_v / temperature); then the
    mean over the assigned crops."""
    v = scores.shape[0]
    logp = F.log_softmax(scores.float() / temperature, dim=2)  # (V, B, K)
    total = scores.new_zeros((), dtype=torch.float32)
    for i, crop in enumerate(crops_for_assign):
        others = [u for u in range(v) if u != crop]
        ce = -(codes[i].unsqueeze(0) * logp[others]).sum(dim=2)  # (V - 1, B)
        total = total + ce.mean()
    return total / len(crops_for_assign)


IGNORE = -100  # the official target of an image with no memory row (CrossEntropyLoss ignore_index)


def deepclusterv2_loss(scores: list[torch.Tensor], targets: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """scores: per head (V B, K_h) prototype scores of every crop, crop-major; targets: (H, B) the
    images' cluster ids per head (IGNORE: none). Mean over heads of the cross-entropy of
    scores / temperature against the image's id, averaged over all crops (official)."""
    v = scores[0].shape[0] // targets.shape[1]
    losses = [F.cross_entropy(s.float() / temperature, t.repeat(v), ignore_index=IGNORE)
              for s, t in zip(scores, targets)]
    return torch.stack(losses).mean()

"""InstDisc's losses over the memory bank (Wu et al., CVPR 2018): the NCE approximation (sec. 3.2,
eq. 6-8) with its normalising constant Z estimated once from the first batch (official
``NCECriterion`` / ``NCEAverage``), and the full non-parametric softmax (eq. 2).

- ``nce_loss``: the NCE objective of sec. 3.2 (Eq. 3-6) with uniform noise P_n = 1/N.
- ``estimate_z``: the Monte-Carlo normalising constant Z = N * E_j[exp(v_j^T f / tau)]
  (Eq. 7), which the official code computes once, on the first batch, and then keeps.
- ``full_softmax_loss``: the exact non-parametric softmax (Eq. 2): cross-entropy over
  all N memory entries, the official ``LinearAverage`` (``nce_k: 0``).

The official NCE criterion adds eps = 1e-7 inside the ratios; here the loss is written in the log
domain (softplus), which equals the formula without eps and cannot overflow.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def estimate_z(logits: torch.Tensor, n: int) -> float:
    """Z = N * mean(exp(logits)), logits = v^T f / tau of a batch's positives and noise (Eq. 7;
    official: once, on the first batch, over all (B, m + 1) entries)."""
    return float(logits.detach().double().exp().mean() * n)


def nce_loss(logits: torch.Tensor, log_z: float, n: int) -> torch.Tensor:
    """NCE loss (Eq. 5-6), mean over the batch, summed over the m noise samples.

    logits: (B, 1 + m) = v^T f / tau, column 0 the positive (data) entry, the rest noise.
    P(i|v) = exp(logit) / Z; h = P / (P + m P_n), P_n = 1 / n;
    loss_b = -log h(positive) - sum_j log(1 - h(noise_j)).
    With log P = logit - log Z and c = log(m / n): -log h = softplus(c - log P),
    -log(1 - h) = softplus(log P - c).
    """
    m = logits.shape[1] - 1
    if m < 1:
        raise ValueError("nce_loss needs at least one noise sample")
    log_p = logits - log_z  # (B, 1 + m)
    c = math.log(m / n)
    pos = F.softplus(c - log_p[:, 0])  # (B,)
    neg = F.softplus(log_p[:, 1:] - c).sum(1)  # (B,)
    return (pos + neg).mean()


def full_softmax_loss(v: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor, temperature: float) -> torch.Tensor:
    """Exact non-parametric softmax (Eq. 2): -log exp(v_i^T f / tau) / sum_j exp(v_j^T f / tau).
    v: (B, D) unit embeddings; memory: (N, D); idx: (B,) each sample's own entry."""
    logits = v @ memory.t() / temperature  # (B, N)
    return F.cross_entropy(logits, idx)

"""Memory bank of per-instance embeddings and the losses over it (InstDisc, Wu et al. CVPR 2018).

- ``MemoryBank``: an (N, D) table, one unit vector per training image (sec. 3.1-3.2).
  It is a registered buffer, so ``state_dict`` (hence the training checkpoint)
  carries it and a resumed run continues from the exact bank.
- ``nce_loss``: the NCE objective of sec. 3.2 (Eq. 3-6) with uniform noise P_n = 1/N.
- ``estimate_z``: the Monte-Carlo normalising constant Z = N * E_j[exp(v_j^T f / tau)]
  (Eq. 7), which the official code computes once, on the first batch, and then keeps.
- ``full_softmax_loss``: the exact non-parametric softmax (Eq. 2): cross-entropy over
  all N memory entries, the official ``LinearAverage`` (``nce_k: 0``).

Where the paper and the official code (zhirongw/lemniscate.pytorch) differ:
- memory update: the paper copies the new embedding into the bank (sec. 3.1); the code
  mixes it in with momentum 0.5 and re-normalises (``momentum``; 0 gives the paper's copy);
- initialisation: the paper speaks of random unit vectors; the code draws each
  coordinate uniformly in [-stdv, stdv], stdv = 1 / sqrt(D / 3) (unit expected norm,
  not normalised): ``init="uniform"`` (default, the code) or ``"unit"``;
- the code's NCE criterion adds eps = 1e-7 inside the ratios; here the loss is written in
  the log domain (softplus), which equals the formula without eps and cannot overflow.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MEMORY_INITS = ("uniform", "unit")


class MemoryBank(nn.Module):
    """(N, D) embeddings on the unit sphere, updated with momentum then re-normalised."""

    memory: torch.Tensor

    def __init__(self, n: int, dim: int, seed: int, init: str = "uniform"):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        if init == "uniform":  # official: U[-stdv, stdv] per coordinate, E||v||^2 = 1
            stdv = 1.0 / math.sqrt(dim / 3.0)
            mem = torch.rand(n, dim, generator=g) * (2 * stdv) - stdv  # (N, D)
        elif init == "unit":  # the paper's "random unit vectors"
            mem = F.normalize(torch.randn(n, dim, generator=g), dim=1)  # (N, D)
        else:
            raise ValueError(f"unknown memory init {init!r}; choose one of {', '.join(MEMORY_INITS)}")
        self.register_buffer("memory", mem)

    @property
    def n(self) -> int:
        return self.memory.shape[0]

    @torch.no_grad()
    def update(self, idx: torch.Tensor, v: torch.Tensor, momentum: float) -> None:
        """memory[idx] <- normalise(momentum * memory[idx] + (1 - momentum) * v).

        Out of place (a new tensor replaces the buffer): the loss of this step may have
        saved the old table for its backward pass (the full softmax does).
        idx: (B,) long, distinct; v: (B, D).
        """
        new = F.normalize(momentum * self.memory[idx] + (1.0 - momentum) * v.to(self.memory.dtype), dim=1)
        self.memory = self.memory.index_copy(0, idx, new)

    def sample_negatives(self, batch: int, m: int, generator: torch.Generator) -> torch.Tensor:
        """(batch, m) indices drawn uniformly with replacement from all N entries (the
        official AliasMethod over uniform unigrams; the positive itself can be drawn)."""
        return torch.randint(0, self.n, (batch, m), generator=generator, device=generator.device)


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

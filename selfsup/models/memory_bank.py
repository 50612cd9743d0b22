"""Memory bank of per-instance embeddings (InstDisc, Wu et al. CVPR 2018); the losses
over it are in ``selfsup/losses/nce.py``.

- ``MemoryBank``: an (N, D) table, one unit vector per training image (sec. 3.1-3.2).
  It is a registered buffer, so ``state_dict`` (hence the training checkpoint)
  carries it and a resumed run continues from the exact bank.

Where the paper and the official code (zhirongw/lemniscate.pytorch) differ:
- memory update: the paper copies the new embedding into the bank (sec. 3.1); the code
  mixes it in with momentum 0.5 and re-normalises (``momentum``; 0 gives the paper's copy);
- initialisation: the paper speaks of random unit vectors; the code draws each
  coordinate uniformly in [-stdv, stdv], stdv = 1 / sqrt(D / 3) (unit expected norm,
  not normalised): ``init="uniform"`` (default, the code) or ``"unit"``;
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



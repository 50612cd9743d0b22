"""Instance-discrimination losses, as pure functions of L2-normalised embeddings.

- ``info_nce``: MoCo (He et al. 2020, Eq. 1; Chen et al. 2020 "MoCo v2"): one query
  against its key and a queue of K negatives, a (K+1)-way softmax at temperature t.
- ``nt_xent``: SimCLR (Chen et al. 2020, sec. 2.1, Eq. 1): 2B views, each view's
  positive is the other view of its image, the 2B-2 other views are negatives; the
  mean over all 2B anchors (the paper's 1/2N sum over both (2k-1, 2k) and (2k, 2k-1)).
  The official TF code (google-research/simclr ``add_contrastive_loss``) returns the
  *sum* of the two directions' means, i.e. 2x this value; with its LARS optimiser
  (scale-invariant update) the two are the same, with SGD a 2x loss is a 2x lr.
- ``invaspread_loss``: Invariant and Spreading instance features (Ye et al. 2019,
  sec. 3.2, Eq. 5) in two forms:
  ``code`` (default; the official mangye16/Unsupervised_Embedding_Learning
  ``BatchCriterion``): both views of every image are anchors (2B of them); P(j | i) is
  a softmax over the 2B-1 other views; the loss is
  -1/(2B) sum_i [log P(pos(i) | i) + sum_{j != i, pos(i)} log(1 - P(j | i))]
  (2B-2 negatives per anchor: the code sums log(1 - P) over all 2B-1 others and then
  subtracts the positive's term). The code multiplies by the *detached* embeddings
  on the right-hand side (``x.t().data``), so gradients flow through the anchor
  only: ``detach=True`` reproduces that.
  ``paper``: the first view plays the un-augmented "original" f_i and the second the
  augmented f^_i; P(i | x^_j) = softmax_k(f_k . f^_j / t) over the B originals;
  J = -1/B [sum_i log P(i | x^_i) + sum_i sum_{j != i} log(1 - P(i | x^_j))].

Distributed (``gather=True``, several processes): each rank's anchors are its own 2B views, the
candidates are the 2BW views of all ranks, gathered with a gradient (``selfsup.core.dist``), and the
positive's index is offset by the rank (SimCLR's ``cross_replica`` negatives; lightly's
``gather_distributed``). With DDP averaging the gradients, the result is the gradient of the loss
over the global batch; at world size 1 it is the one-process loss exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.core import dist


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> torch.Tensor:
    """MoCo's InfoNCE. q, k: (B, D) unit rows (k without grad), queue: (K, D) unit rows."""
    l_pos = (q * k).sum(1, keepdim=True)  # (B, 1)
    l_neg = q @ queue.t()  # (B, K)
    logits = torch.cat([l_pos, l_neg], 1) / t  # (B, 1 + K); the positive is class 0
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def _candidates(z1: torch.Tensor, z2: torch.Tensor, gather: bool, grad: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anchors (2B, D) = this rank's [z1; z2]; candidates (2BW, D) = [z1 of all ranks; z2 of all
    ranks]; (2B, 2) the candidate index of each anchor itself and of its positive (the other view)."""
    b, w = len(z1), dist.world() if gather else 1
    off = dist.rank() * b if gather else 0
    gat = (dist.all_gather_grad if grad else dist.all_gather) if gather else (lambda x: x)
    cand = torch.cat([gat(z1), gat(z2)])  # (2BW, D)
    i = torch.arange(b, device=z1.device)
    me = torch.cat([off + i, w * b + off + i])  # (2B,)
    pos = torch.cat([w * b + off + i, off + i])  # (2B,) the other view of the same image
    return torch.cat([z1, z2]), cand, torch.stack([me, pos], 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float, gather: bool = False) -> torch.Tensor:
    """SimCLR's NT-Xent. z1, z2: (B, D) unit rows, row b of each a view of image b; ``gather``:
    the negatives of all ranks (module docstring)."""
    z, cand, idx = _candidates(z1, z2, gather)
    sim = z @ cand.t() / t  # (2B, 2BW)
    self_mask = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, idx[:, :1], True)
    sim = sim.masked_fill(self_mask, float("-inf"))  # a view is not its own candidate
    return F.cross_entropy(sim, idx[:, 1])


def _log1m_exp(log_p: torch.Tensor) -> torch.Tensor:
    """log(1 - p) from log p (p < 1), stable near both ends."""
    # each branch sees only its own range, so the unused one stays finite (no NaN gradients)
    near_one = log_p > -0.6931
    hi = torch.log(-torch.expm1(log_p.clamp(min=-0.6931)))
    lo = torch.log1p(-torch.exp(log_p.clamp(max=-0.6931)))
    return torch.where(near_one, hi, lo)


def _log_complement(log_p: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log(1 - p) for rows of log-probabilities that sum to 1 over ``valid`` (R, C); 0 off ``valid``.

    For each row's largest p (the only one that can be near 1, where 1 - p cancels in
    float32) it is computed exactly as log sum of the row's other probabilities."""
    lp = log_p.masked_fill(~valid, float("-inf"))  # (R, C)
    out = _log1m_exp(lp)  # (R, C); exp(-inf) = 0 -> 0 off valid
    top = lp.argmax(1, keepdim=True)  # (R, 1)
    rest = torch.logsumexp(lp.scatter(1, top, float("-inf")), 1, keepdim=True)  # (R, 1) log(1 - p_top)
    return out.scatter(1, top, rest)


def invaspread_loss(z1: torch.Tensor, z2: torch.Tensor, t: float, form: str = "code",
                    detach: bool = True, gather: bool = False) -> torch.Tensor:
    """InvaSpread's loss. z1, z2: (B, D) unit rows; see the module docstring for the forms;
    ``gather`` (code form): the other views of all ranks are candidates."""
    b = len(z1)
    if form == "code":
        # the official one-sided gradient multiplies by detached views: no gradient to gather then
        x, other, idx = _candidates(z1, z2, gather, grad=not detach)
        if detach:
            other = other.detach()
        n = 2 * b
        logits = x @ other.t() / t  # (2B, 2BW); row i: anchor i against every view j
        eye = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx[:, :1], True)  # each anchor itself
        log_p = logits - torch.logsumexp(logits.masked_fill(eye, float("-inf")), 1, keepdim=True)  # log P(j | i)
        pos = idx[:, 1]  # (2B,) the other view
        pos_mask = torch.zeros_like(eye).scatter_(1, pos[:, None], True)
        log_p_pos = log_p.gather(1, pos[:, None]).squeeze(1)  # (2B,)
        neg = _log_complement(log_p, ~eye).masked_fill(eye | pos_mask, 0.0).sum(1)  # (2B,) over the 2BW-2 negatives
        return -(log_p_pos + neg).sum() / n
    if form == "paper":
        # row j: augmented view f^_j; column k: original f_k; log P(k | x^_j)
        log_p = torch.log_softmax(z2 @ z1.t() / t, 1)  # (B, B)
        eye = torch.eye(b, dtype=torch.bool, device=z1.device)
        pos = log_p.diagonal()  # (B,) log P(i | x^_i)
        neg = _log_complement(log_p, torch.ones_like(eye)).masked_fill(eye, 0.0).sum()  # sum_{i, j != i} log(1 - P(i | x^_j))
        return -(pos.sum() + neg) / b
    raise ValueError(f"invaspread loss form: unknown {form!r}; choose code or paper")


def byol_loss(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL eq. 2: mean over the batch of ||q/|q| - z/|z|||^2 = 2 - 2 cos(q, z); ``z`` (the target's
    projection) gets no gradient. q, z: (B, D)."""
    return (2.0 - 2.0 * F.cosine_similarity(q, z.detach(), dim=1)).mean()


def simsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, stopgrad(z)) (eq. 1 and 3): the negative cosine similarity, batch mean.
    p, z: (B, D)."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()

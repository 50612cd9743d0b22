"""MLCD's multi-label cluster-discrimination loss, with PartialFC-style negative sampling
(An, Yang, Dai, Feng, Deng; "Multi-label Cluster Discrimination for Visual Representation
Learning", ECCV 2024, sec. 3.2). The paper's training code is not public; this follows the
paper's formula and, for the sampling and the margin, the PartialFC / CombinedMarginLoss code
of its predecessor UNICOM (deepglint/unicom, ``unicom/partial_fc.py``).

For an image with normalised embedding f, learnable class centres w_c (normalised), cosine
similarities s_c = f . w_c, its positive set P (its top-l nearest k-means centres) and the
sampled negative set N:

    L = log(1 + sum_{j in N} exp(s * s_j)) + log(1 + sum_{i in P} exp(-s * m(s_i)))

with scale s and the margin m(.) applied to the positives only: ``arc`` (ArcFace's additive
angular margin, cos(theta + m), as UNICOM's CombinedMarginLoss with m2) or ``cosine``
(CosFace's s_i - m). Positives and negatives are separated, so the l positive labels never
compete against each other (the ambiguity a plain softmax over l positives has).

Negative sampling (PartialFC, sec. 3.2 "to handle a million centres"): every positive centre of
the batch is kept, plus a random ``ratio`` of the other centres, drawn afresh each step.
A batch's sampled set is shared by its images, so another image's positive is a negative here.
PartialFC draws ``ratio * C`` centres in total with the positives among them; we draw ``ratio``
of the non-positive centres (the issue's definition; the two differ by at most the batch's
positives, negligible at a million centres).

The soft-label variant (``soft_label_loss``): soft targets over the top-l centres (weights that
sum to one, from their similarities) and cross-entropy against the softmax over the sampled
centres; the way the method is often explained, not the paper's loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MARGINS = ("arc", "cosine")


def sample_centres(pos: torch.Tensor, num_centres: int, ratio: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Sorted ids of this step's centres: every id in ``pos`` (B, l) plus ``round(ratio * others)``
    distinct random others (PartialFC's ``sample``: random scores, positives forced to the top).
    ratio >= 1 keeps all ``num_centres``. -> (M,) int64 on pos' device."""
    if ratio >= 1.0:
        return torch.arange(num_centres, device=pos.device)
    positives = torch.unique(pos)  # (P,), sorted
    n_neg = int(round(ratio * (num_centres - positives.numel())))
    score = torch.rand(num_centres, generator=generator).to(pos.device)  # (C,) in [0, 1)
    score[positives] = 2.0  # positives always kept
    index = torch.topk(score, positives.numel() + n_neg).indices  # (M,)
    return index.sort().values


def cosine_logits(emb: torch.Tensor, centres: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity of each normalised embedding with each (sampled) normalised centre.
    (B, D), (C, D), (M,) -> (B, M), clamped to [-1, 1] as PartialFC does."""
    w = centres if index is None else centres[index]  # (M, D)
    return F.linear(F.normalize(emb, dim=1), F.normalize(w, dim=1)).clamp(-1.0, 1.0)


def positive_columns(index: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Columns of the positives in the sampled (sorted) ``index``: (M,), (B, l) -> (B, l)."""
    return torch.searchsorted(index, pos)


MARGIN_GRADS = ("straight_through", "exact")


def apply_margin(cos: torch.Tensor, margin: float, margin_type: str, grad: str = "exact") -> torch.Tensor:
    """The positives' logit before scaling: cos(theta + m) (``arc``) or cos - m (``cosine``).

    ``grad``: ``exact`` differentiates the margin function; ``straight_through`` is what UNICOM's /
    PartialFC's CombinedMarginLoss does (arccos, + m and cos applied in place under no_grad on the
    cosine tensor): the forward value is the margin logit, the gradient that of the plain cosine."""
    if margin == 0.0:
        return cos
    if grad == "straight_through":
        return cos + (apply_margin(cos.detach(), margin, margin_type) - cos.detach())
    if margin_type == "arc":
        # clamp off +-1: the derivative of arccos is infinite there (PartialFC clamps to [-1, 1]
        # and does arccos under no_grad); theta + m is capped at pi so the logit stays monotone
        theta = torch.acos(cos.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
        return torch.cos((theta + margin).clamp(max=math.pi))
    if margin_type == "cosine":
        return cos - margin
    raise ValueError(f"margin_type: unknown {margin_type!r}; choose one of {', '.join(MARGINS)}")


def multilabel_loss(cos: torch.Tensor, pcol: torch.Tensor, scale: float, margin: float,
                    margin_type: str = "arc", margin_grad: str = "exact") -> torch.Tensor:
    """MLCD's loss per image (sec. 3.2). cos (B, M) similarities with the sampled centres,
    pcol (B, l) the columns of each image's positives -> (B,).

    log(1 + sum exp(z)) is computed as logsumexp over [0, z...] (stable at scale 64)."""
    b = cos.shape[0]
    zero = cos.new_zeros(b, 1)
    neg_mask = torch.ones_like(cos, dtype=torch.bool).scatter_(1, pcol, False)  # (B, M)
    z_neg = torch.where(neg_mask, scale * cos, torch.full_like(cos, -math.inf))  # (B, M)
    pos_logit = apply_margin(cos.gather(1, pcol), margin, margin_type, margin_grad)  # (B, l)
    l_neg = torch.logsumexp(torch.cat([zero, z_neg], 1), dim=1)  # (B,)
    l_pos = torch.logsumexp(torch.cat([zero, -scale * pos_logit], 1), dim=1)  # (B,)
    return l_neg + l_pos


def soft_targets(sims: torch.Tensor, temperature: float) -> torch.Tensor:
    """Weights over an image's top-l centres from their similarities: softmax(sim / T), rows sum to 1.
    (B, l) -> (B, l)."""
    return torch.softmax(sims / temperature, dim=1)


def soft_label_loss(cos: torch.Tensor, pcol: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """Cross-entropy with soft multi-label targets: -sum_i w_i log softmax(scale * cos)_i over the
    sampled centres. cos (B, M), pcol (B, l), weights (B, l) -> (B,)."""
    logp = torch.log_softmax(scale * cos, dim=1)  # (B, M)
    return -(weights * logp.gather(1, pcol)).sum(1)


def _dist_logsumexp1p(z: torch.Tensor) -> torch.Tensor:
    """log(1 + sum_j exp(z_j)) per row over the entries of all ranks: z (R, M_r) this rank's part
    (-inf: absent) -> (R,), identical on every rank. Shifted by the all-reduced row max (a constant
    for the gradient), the shifted sums all-reduced with their gradient."""
    from selfsup.core import dist

    with torch.no_grad():
        m = dist.all_reduce(z.max(1).values.clamp(min=0.0), "max")  # (R,) >= 0: the "1" term is exp(0)
    s = torch.exp(z - m[:, None]).sum(1)  # (R,) this rank's share; exp(-inf) = 0
    s = dist.all_reduce_grad(s) + torch.exp(-m)  # + the 1, once
    return m + torch.log(s)


def sharded_multilabel_loss(emb: torch.Tensor, pos: torch.Tensor, centres: torch.Tensor, lo: int, num_centres: int,
                            ratio: float, scale: float, margin: float, margin_type: str = "arc",
                            margin_grad: str = "exact") -> torch.Tensor:
    """MLCD's loss with the class centres sharded over the ranks (PartialFC's model parallelism):
    rank r holds centres [lo, lo + C_r) of ``num_centres``. The embeddings and positives of all ranks
    are gathered (the embeddings with their gradient); each rank samples negatives from its own
    shard (every positive of the global batch that falls in it kept, ``ratio`` of the others) and
    computes its share of each image's two sums; the log(1 + sum) of all shards is a distributed
    log-sum-exp. emb (B, D), pos (B, l) global centre ids -> (W B,) the per-image losses of the
    global batch, the same on every rank (mean them; the centres' gradient is that of the global
    mean, the backbone's that of the global mean times W, which DDP's averaging divides back)."""
    from selfsup.core import dist

    e = dist.all_gather_grad(emb)  # (W B, D)
    p = dist.all_gather(pos)  # (W B, l) global centre ids
    c_r = centres.shape[0]
    local = (p >= lo) & (p < lo + c_r)  # (W B, l) positives in this shard
    index = sample_centres((p[local] - lo).view(-1, 1), c_r, ratio)  # (M_r,) local ids, sorted
    m_r = index.numel()
    # columns of the positives in the sampled set; off-shard positives point at a dummy column m_r
    pcol = torch.where(local, positive_columns(index, (p - lo).clamp(0, c_r - 1)), torch.full_like(p, m_r))
    cos = cosine_logits(e, centres, index)  # (W B, M_r)
    cos_x = torch.cat([cos, cos.new_zeros(len(cos), 1)], 1)  # (W B, M_r + 1)
    neg = torch.ones_like(cos_x, dtype=torch.bool).scatter_(1, pcol, False)[:, :m_r]  # (W B, M_r)
    z_neg = torch.where(neg, scale * cos, torch.full_like(cos, -math.inf))
    pos_logit = apply_margin(cos_x.gather(1, pcol), margin, margin_type, margin_grad)  # (W B, l)
    z_pos = torch.where(local, -scale * pos_logit, torch.full_like(pos_logit, -math.inf))
    return _dist_logsumexp1p(z_neg) + _dist_logsumexp1p(z_pos)

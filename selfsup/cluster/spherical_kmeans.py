"""DeepCluster-v2's spherical k-means (Caron et al., NeurIPS 2020, appendix; official
``main_deepclusterv2.py``, ``cluster_memory``): k-means by dot product on unit rows, run in torch on the
training device over row shards held by the ranks, with the sums and counts all-reduced. The faiss
k-means of ``selfsup/cluster/kmeans.py`` is DeepCluster's (one process, L2, on the CPU or one GPU)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfsup.core import dist


# --------------------------------------------------------------------------- spherical k-means
@dataclass
class SphericalKMeans:
    centroids: torch.Tensor  # (k, D) float32, unit rows, the same on every rank
    assign: torch.Tensor  # (n_r,) long: this rank's rows' cluster
    counts: torch.Tensor  # (k,) long: global cluster sizes of the final assignment
    objective: float  # global mean cosine of the rows to their centroid


def _rank_offsets(n_local: int, device: torch.device) -> tuple[int, int]:
    """(global row index of this rank's first row, global N): shards in rank order."""
    sizes = dist.all_gather(torch.tensor([n_local], device=device)).tolist()
    return sum(sizes[:dist.rank()]), sum(sizes)


def _nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, D), (k, D) -> the largest dot product's centroid (n,) long and its value (n,)."""
    ids, vals = [], []
    for s in range(0, len(x), chunk):
        v, i = (x[s:s + chunk] @ c.t()).max(dim=1)  # (chunk, k) -> (chunk,)
        ids.append(i)
        vals.append(v)
    if not ids:
        return x.new_zeros(0, dtype=torch.long), x.new_zeros(0)
    return torch.cat(ids), torch.cat(vals)


@torch.no_grad()
def spherical_kmeans(x_shard: torch.Tensor, k: int, iters: int = 10,
                     generator: torch.Generator | None = None) -> SphericalKMeans:
    """Spherical k-means over the rows of all ranks (collective; one process: a plain k-means of
    ``x_shard``), as the official ``cluster_memory``.

    x_shard: (n_r, D) unit rows held by this rank (rank r's rows follow rank r-1's). Initial
    centroids: rows ``randperm(N, generator)[:k]`` of the concatenated rows (the generator must give
    the same draw on every rank). Then ``iters`` x (E: nearest centroid by dot product; M: each
    non-empty cluster's centroid <- its mean, the sums and counts all-reduced; every centroid
    re-normalised; an empty cluster keeps its centroid) and a final E step."""
    x = x_shard.float()
    off, n = _rank_offsets(len(x), x.device)
    if not 1 <= k <= n:
        raise ValueError(f"k: need 1 <= k <= {n} rows, got {k}")
    pick = torch.randperm(n, generator=generator)[:k].to(x.device)  # (k,) global rows
    mine = (pick >= off) & (pick < off + len(x))
    c = x.new_zeros(k, x.shape[1])  # (k, D)
    c[mine] = x[pick[mine] - off]
    c = dist.all_reduce(c)  # each row from the one rank that holds it (others add zeros)
    for it in range(iters + 1):
        assign, best = _nearest(x, c)  # (n_r,), (n_r,)
        if it == iters:
            break
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, assign, x.double())
        counts = torch.bincount(assign, minlength=k).to(x.device)  # (k,)
        dist.all_reduce(sums)
        dist.all_reduce(counts)
        full = counts > 0
        new = c.double()
        new[full] = sums[full] / counts[full].unsqueeze(1)
        c = F.normalize(new, dim=1).float()  # empty clusters: their previous (unit) centroid
    counts = dist.all_reduce(torch.bincount(assign, minlength=k).to(x.device))
    total = dist.all_reduce(best.double().sum())
    return SphericalKMeans(c, assign, counts, float(total) / n)

"""Feature extraction: a model in eval mode over a whole split, a batch at a time, no grad.

The loader delivers uint8 batches (``selfsup.data.loader.eval_batches``: memory-map slices for
arrays; decode + resize 256 + centre crop 224 in workers for image files); scaling and
normalisation run on the device. The output (N, D) float32 is allocated once.

Several processes (``extract_sharded``): each rank extracts its contiguous share of the rows and
the shares are gathered in rank order, so the result equals one process's.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from selfsup.core import dist
from selfsup.data.prepared import FileSplit, Split
from selfsup.data.loader import eval_batches


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1], normalised per channel."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.to(torch.float32) / 255.0 - m) / s


@torch.no_grad()
def extract_features(
    model: Callable[[torch.Tensor], torch.Tensor],
    split: Split | FileSplit,
    meta: dict[str, Any],
    device: torch.device,
    batch_size: int = 256,
    desc: str = "extract",
    workers: int = -1,
    resize: int = 256,
    crop: int = 224,
    indices: np.ndarray | None = None,
) -> np.ndarray:
    """(N, D) float32 features of ``model`` (an ``nn.Module`` is put in eval mode for the pass)
    on ``split`` (or its rows ``indices``), eval geometry."""
    module = model if isinstance(model, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    n = len(split) if indices is None else len(indices)
    out: np.ndarray | None = None
    s = 0
    for xb in tqdm(eval_batches(split, batch_size, workers, resize, crop, indices), desc=desc, unit="batch",
                   leave=False, mininterval=2, total=-(-n // batch_size), disable=not dist.is_main()):
        f = model(normalize(xb.to(device, non_blocking=True), meta["mean"], meta["std"])).float()  # (B, D)
        if out is None:
            out = np.empty((n, f.shape[1]), np.float32)
        out[s:s + len(f)] = f.cpu().numpy()
        s += len(f)
    if module is not None:
        module.train(was_training)
    assert out is not None and s == n, (s, n)
    if not np.isfinite(out).all():
        raise FloatingPointError(f"{desc}: non-finite features (diverged model?)")
    return out


def extract_sharded(model: Callable[[torch.Tensor], torch.Tensor], split: Split | FileSplit, meta: dict[str, Any],
                    device: torch.device, batch_size: int = 256, desc: str = "extract", workers: int = -1,
                    resize: int = 256, crop: int = 224) -> np.ndarray:
    """(N, D) features of the whole split on every rank; each rank extracts its share (one
    process: ``extract_features``)."""
    if dist.world() == 1:
        return extract_features(model, split, meta, device, batch_size, desc, workers, resize, crop)
    sl = dist.shard(len(split))
    f = extract_features(model, split, meta, device, batch_size, desc, workers, resize, crop,
                         indices=np.arange(sl.start, sl.stop))
    return dist.all_gather_varlen(torch.from_numpy(f).to(device)).cpu().numpy()


@torch.no_grad()
def apply_head(head: torch.nn.Module, feats: np.ndarray, device: torch.device, batch_size: int = 4096) -> np.ndarray:
    """(N, D) backbone features -> (N, D') through ``head`` (eval mode), a batch at a time: the
    head of a paper's protocol costs no second pass through the backbone."""
    head.eval()
    out = [head(torch.from_numpy(feats[s:s + batch_size]).to(device)).float().cpu().numpy()  # (b, D')
           for s in range(0, len(feats), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

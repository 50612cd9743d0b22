"""Linear probes on every stage of a network (DeepCluster Table 1, SeLa, InstDisc: AlexNet conv1-conv5;
ResNet stages), on frozen features.

The papers' recipe (DeepCluster's ``eval_linear.py``, which SeLa and InstDisc follow): the activations
of a layer are average-pooled to about 9,000 dimensions (AlexNet conv1: 96 x 10 x 10, conv2 / conv5:
256 x 6 x 6, conv3 / conv4: 384 x 5 x 5), go through batch norm without affine parameters, then a
linear classifier. Here:

- pooling: ``AdaptiveAvgPool2d(s)`` with s = round(sqrt(target_dim / C)), capped at the map's side,
  which gives those sizes for AlexNet at 224 px (the official code uses fixed AvgPool2d kernels
  and strides that land on the same grids);
- the affine-free batch norm is the fixed train-set standardisation of ``selfsup.linear`` (the same
  transform with the statistics of the whole training set instead of each batch's);
- the classifier trains on features extracted once with the eval transform (the centre crop). The
  official probes train on random crops every epoch and test on 10 crops; that costs a full
  backbone pass per epoch and is not done here (a documented difference, reported beside the
  numbers).

``probe.max_train`` caps the training rows (a seeded subset) so a layer of ImageNet fits in memory.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from selfsup import dist
from selfsup.data import FileSplit, Split
from selfsup.features import normalize
from selfsup.loader import eval_batches


def probe_points(backbone: nn.Module) -> dict[str, nn.Module]:
    """name -> the module whose output is that stage's activation, in forward order:
    AlexNet conv1-conv5 (the ReLU after each conv + BN), ResNet conv1 (stem) and layer1-layer4,
    smallcnn block1-block3 (the ReLU of each conv block), NIN block1-block4 (each block's output)."""
    trunk = backbone.trunk
    if hasattr(trunk, "blocks"):  # RotNet's NIN: each block's output (after its pooling), as the paper evaluates
        return {f"block{i + 1}": b for i, b in enumerate(trunk.blocks)}
    if hasattr(trunk, "layer4"):  # torchvision ResNet
        return {"conv1": trunk.relu, **{f"layer{i}": getattr(trunk, f"layer{i}") for i in range(1, 5)}}
    seq = trunk.features if hasattr(trunk, "features") else trunk.net
    relus = [m for m in seq if isinstance(m, nn.ReLU)]
    prefix = "conv" if hasattr(trunk, "features") else "block"
    return {f"{prefix}{i + 1}": m for i, m in enumerate(relus)}


def pool_side(channels: int, side: int, target_dim: int) -> int:
    """The pooled grid side: C x s x s close to ``target_dim``, at most the map's side."""
    return max(1, min(side, round(math.sqrt(target_dim / channels))))


@torch.no_grad()
def layer_features(backbone: nn.Module, split: Split | FileSplit, meta: dict[str, Any], device: torch.device,
                   layers: list[str], target_dim: int = 9216, batch_size: int = 256, workers: int = -1,
                   resize: int = 256, crop: int = 224, indices: np.ndarray | None = None,
                   desc: str = "probe features") -> dict[str, np.ndarray]:
    """layer -> (N, C * s * s) float32 pooled activations of ``split`` (eval mode, eval transform),
    from one pass of the backbone per batch (forward hooks)."""
    points = probe_points(backbone)
    unknown = [n for n in layers if n not in points]
    if unknown:
        raise ValueError(f"probe.layers: {unknown[0]!r} is not a stage of this backbone; it has {', '.join(points)}")
    was = backbone.training
    backbone.eval()
    grabbed: dict[str, torch.Tensor] = {}
    hooks = [points[n].register_forward_hook(lambda _m, _i, o, n=n: grabbed.__setitem__(n, o)) for n in layers]
    n = len(split) if indices is None else len(indices)
    out: dict[str, np.ndarray] = {}
    s = 0
    try:
        for xb in tqdm(eval_batches(split, batch_size, workers, resize, crop, indices), desc=desc, unit="batch",
                       leave=False, mininterval=2, total=-(-n // batch_size), disable=not dist.is_main()):
            backbone(normalize(xb.to(device, non_blocking=True), meta["mean"], meta["std"]))
            for name in layers:
                a = grabbed[name].float()  # (B, C, H, W)
                g = pool_side(a.shape[1], min(a.shape[2:]), target_dim)
                f = torch.flatten(nn.functional.adaptive_avg_pool2d(a, g), 1)  # (B, C * g * g)
                if name not in out:
                    out[name] = np.empty((n, f.shape[1]), np.float32)
                out[name][s:s + len(f)] = f.cpu().numpy()
            s += len(xb)
    finally:
        for h in hooks:
            h.remove()
        backbone.train(was)
    for name, f in out.items():
        if not np.isfinite(f).all():
            raise FloatingPointError(f"{desc}: non-finite {name} activations")
    return out


def probe_all(backbone: nn.Module, data: Any, device: torch.device, cfg: Any, seed: int,
              workers: int = -1, resize: int = 256, crop: int = 224, batch_size: int = 256) -> dict[str, Any]:
    """Per-layer linear probes of ``backbone`` (``cfg``: the ``probe`` params block) on ``data``:
    {"layers": {name: {"top1", "top5", "dim"}}, "protocol": ...}. Layers one at a time (one layer's
    pooled features in memory)."""
    from selfsup.evaluate import linear_eval

    names = list(probe_points(backbone)) if cfg.layers == ["all"] else list(cfg.layers)
    idx = None
    if cfg.max_train and cfg.max_train < len(data.train):
        idx = np.sort(np.random.default_rng(seed).choice(len(data.train), cfg.max_train, replace=False))
    ytr = data.train.y if idx is None else data.train.y[idx]
    res: dict[str, Any] = {}
    for name in names:
        geo = {"workers": workers, "resize": resize, "crop": crop, "target_dim": cfg.target_dim,
               "batch_size": batch_size}
        tr = layer_features(backbone, data.train, data.meta, device, [name], indices=idx,
                            desc=f"probe {name} train", **geo)[name]
        te = layer_features(backbone, data.test, data.meta, device, [name], desc=f"probe {name} test", **geo)[name]
        r = linear_eval(tr, ytr, te, data.test.y, num_classes=len(data.meta["classes"]), epochs=cfg.epochs,
                        batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=seed, device=device)
        res[name] = {**r, "dim": int(tr.shape[1])}
    return {"layers": res, "protocol": f"avg-pooled to ~{cfg.target_dim} dims, standardised, linear, "
                                       f"{cfg.epochs} epochs on centre-crop features"}

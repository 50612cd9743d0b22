"""Linear probes on every stage of a network (DeepCluster Table 1, SeLa, InstDisc: AlexNet conv1-conv5;
ResNet stages), on frozen features.

The papers' recipe (DeepCluster's ``eval_linear.py``; SeLa's ``eval_linear_probes.py`` takes the same
grids with max pooling): the activations of a layer are average-pooled to about 9,000 dimensions
(AlexNet conv1: 96 x 10 x 10, conv2 / conv5: 256 x 6 x 6, conv3 / conv4: 384 x 5 x 5), go through
batch norm without affine parameters, then a linear classifier. Here:

- pooling: ``AdaptiveAvgPool2d(s)`` with s = round(sqrt(target_dim / C)), capped at the map's side,
  which gives those sizes for AlexNet at 224 px (the official code uses fixed AvgPool2d kernels
  and strides that land on the same grids);
- the affine-free batch norm is the fixed train-set standardisation of ``selfsup.eval.linear_probe`` (the same
  transform with the statistics of the whole training set instead of each batch's);
- ``probe.pooling``: ``avg`` (DeepCluster's ``AvgPool2d``), ``max`` (SeLa's ``eval_linear_probes.py``
  ``MaxPool2d``, RotNet's ``AdaptiveMaxPool2d``) or ``bilinear`` (``caffe_resize``: the Caffe ``Resize``
  layers of the colourisation repo's linear test, which the Jigsaw, context-prediction and
  colourisation papers report; BatchNorm without scale after them, as the paper protocol's);
- ``probe.classifier``: ``linear`` or ``mlp`` (``mlp_classifier``: RotNet's CIFAR-10 non-linear
  per-block classifiers);
- ``probe.lr_schedule``: ``step`` (``step_lr``: absolute factors from epoch or iteration milestones,
  RotNet's ``LUT_lr`` and Caffe's step policy) or ``cosine`` per step; ``probe.nesterov`` (RotNet);
- ``probe.protocol: fast``: the classifier trains on features extracted once with the eval transform
  (the centre crop), a one-crop test; ``probe.max_train`` caps the training rows (a seeded subset) so
  a layer of ImageNet fits in memory;
- ``probe.protocol: paper`` (``probe_paper``): the whole training set, a random resized crop + flip of
  every image each epoch through the frozen backbone (every layer's probe trained from the same pass,
  as SeLa's ``Probes``), ``BatchNorm2d(affine=False)`` on the pooled map (SeLa's; running statistics
  at test), and a 10-crop test (the four corners and the centre of the image resized to
  ``resize_size``, and their mirror images), the softmax averaged over the crops (DeepCluster's
  ``eval_linear.py --tencrops``; SeLa averages the logits). Differences: DeepCluster trains on
  RandomCrop(224) of the 256 centre square and decays the lr as lr0 / sqrt(1 + lr0 wd t); SeLa's lr
  steps x0.1 every 10 of 36 epochs (``lr_steps`` [10, 20, 30]); here SGD momentum 0.9 with the
  ``probe`` lr, weight decay and schedule, as the fast protocol. Image arrays (digits, CIFAR) have no
  resize: their ten crops are taken at the native side from the image upsampled by
  ``resize_size / crop_size``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from selfsup.core import dist
from selfsup.data.prepared import FileSplit, Split
from selfsup.models.features import normalize
from selfsup.data.loader import eval_batches, resolve_workers
from selfsup.models.backbones import per_image, probe_points


def pool_side(channels: int, side: int, target_dim: int) -> int:
    """The pooled grid side: C x s x s close to ``target_dim``, at most the map's side."""
    return max(1, min(side, round(math.sqrt(target_dim / channels))))


def pool(a: torch.Tensor, target_dim: int, pooling: str = "avg") -> torch.Tensor:
    """(B, C, H, W) activations -> (B, C, s, s), s = ``pool_side``: adaptive average or max pooling, or
    the Caffe ``Resize`` layer (``caffe_resize``)."""
    s = pool_side(a.shape[1], min(a.shape[2:]), target_dim)
    if pooling == "bilinear":
        return caffe_resize(a, s)
    return nn.functional.adaptive_avg_pool2d(a, s) if pooling == "avg" else nn.functional.adaptive_max_pool2d(a, s)


def _resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64: one axis of the Caffe ``Resize`` layer (philkr's Caffe, whose ``Resize`` and
    ``ColorConv`` layers the colourisation repo's prototxts use; ``resize_layer.cpp``). The scale is
    s = (n_out - 1) / (n_in - 1) (the first and last samples aligned). When s < 1 a tent filter of radius
    R = 1 / s first spreads each input over its neighbours: weights R - |r| for the integers |r| < R,
    normalised, the edge samples repeated beyond the border. Then output i is the linear
    interpolation at x = i / s (clamped to the map) between floor(x) and the next sample."""
    if n_out == n_in:
        return torch.eye(n_in, dtype=torch.float64)
    if n_in < 2 or n_out < 2:
        raise ValueError(f"probe.pooling bilinear: a {n_in} -> {n_out} resize has no corner-aligned scale")
    scale = (n_out - 1) / (n_in - 1)
    tent = torch.eye(n_in, dtype=torch.float64)
    if scale < 1:
        radius = 1.0 / max(scale, 0.01)
        tent = torch.zeros(n_in, n_in, dtype=torch.float64)
        for r in range(-math.ceil(radius) + 1, math.ceil(radius)):  # the integers |r| < R
            w = radius - abs(r)
            for k in range(n_in):
                tent[k, min(max(k + r, 0), n_in - 1)] += w
        tent /= tent.sum(1, keepdim=True)
    lerp = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        x = min(max(i / scale, 0.0), n_in - 1.0)
        i0 = int(x)
        i1 = min(i0 + 1, n_in - 1)
        w0 = i1 - x  # Caffe's weight of sample i0 (0 when x is the last sample)
        lerp[i, i0] += w0
        lerp[i, i1] += 1.0 - w0
    return lerp @ tent


def caffe_resize(a: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, side, side): the colourisation repo's linear-test pooling (richzhang/colorization
    feature_learning_tests/linear/train_val.prototxt: ``Resize`` to 10 / 6 / 5 / 5 / 6, then BatchNorm),
    each axis a fixed linear map (``_resize_matrix``)."""
    h, w = a.shape[2:]
    my = _resize_matrix(h, side).to(a.device, a.dtype)  # (side, H)
    mx = _resize_matrix(w, side).to(a.device, a.dtype)  # (side, W)
    return torch.einsum("ih,bchw,jw->bcij", my, a, mx)


def step_lr(cfg: Any, epoch: int, step: int) -> float:
    """``probe.lr_schedule: step``: the lr at (0-based) ``epoch`` and optimiser ``step``: from the k-th
    milestone of ``lr_steps`` passed on, lr x ``lr_factors[k]`` (empty factors: x0.1 per milestone), the
    milestones counted in epochs or iterations (``lr_step_unit``). RotNet's ``adjust_learning_rates``
    (the LUT_lr entry of the first bound above the epoch) and Caffe's ``step`` policy (base_lr x
    gamma ^ floor(iter / stepsize)) are both this."""
    t = epoch if cfg.lr_step_unit == "epoch" else step
    passed = sum(t >= m for m in cfg.lr_steps)
    if not passed:
        return cfg.lr
    return cfg.lr * (cfg.lr_factors[passed - 1] if cfg.lr_factors else 0.1 ** passed)


@torch.no_grad()
def layer_features(backbone: nn.Module, split: Split | FileSplit, meta: dict[str, Any], device: torch.device,
                   layers: list[str], target_dim: int = 9216, batch_size: int = 256, workers: int = -1,
                   resize: int = 256, crop: int = 224, indices: np.ndarray | None = None,
                   desc: str = "probe features", pooling: str = "avg") -> dict[str, np.ndarray]:
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
                act = per_image(grabbed[name].float(), len(xb))  # a patch-grid encoder's: averaged per image
                f = torch.flatten(pool(act, target_dim, pooling), 1)  # (B, C * s * s)
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
              workers: int = -1, resize: int = 256, crop: int = 224, batch_size: int = 256,
              make: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Per-layer linear probes of ``backbone`` (``cfg``: the ``probe`` params block) on ``data``:
    {"layers": {name: {"top1", "top5", "dim"}}, "protocol": ...}. Fast protocol: layers one at a time
    (one layer's pooled features in memory); paper protocol: ``probe_paper`` (``make``: the training
    loop's ``batch_maker``, which it needs for its crops)."""
    from selfsup.eval.protocols import linear_eval

    names = list(probe_points(backbone)) if cfg.layers == ["all"] else list(cfg.layers)
    if cfg.protocol == "paper":
        if make is None:
            raise ValueError("probe.protocol: paper needs the training batches (make)")
        return probe_paper(backbone, data, device, cfg, seed, names, make, workers, resize, crop, batch_size)
    idx = None
    if cfg.max_train and cfg.max_train < len(data.train):
        idx = np.sort(np.random.default_rng(seed).choice(len(data.train), cfg.max_train, replace=False))
    ytr = data.train.y if idx is None else data.train.y[idx]
    res: dict[str, Any] = {}
    for name in names:
        geo = {"workers": workers, "resize": resize, "crop": crop, "target_dim": cfg.target_dim,
               "batch_size": batch_size, "pooling": cfg.pooling}
        tr = layer_features(backbone, data.train, data.meta, device, [name], indices=idx,
                            desc=f"probe {name} train", **geo)[name]
        te = layer_features(backbone, data.test, data.meta, device, [name], desc=f"probe {name} test", **geo)[name]
        r = linear_eval(tr, ytr, te, data.test.y, num_classes=len(data.meta["classes"]), epochs=cfg.epochs,
                        batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=seed, device=device,
                        lr_at=None if cfg.lr_schedule == "cosine" else (lambda ep, st: step_lr(cfg, ep, st)),
                        nesterov=cfg.nesterov, classifier=cfg.classifier)
        res[name] = {**r, "dim": int(tr.shape[1])}
    return {"layers": res, "protocol": f"{cfg.pooling}-pooled to ~{cfg.target_dim} dims, standardised, "
                                       f"{cfg.classifier}, {_schedule_text(cfg)}, {cfg.epochs} epochs on "
                                       f"centre-crop features"}


def _schedule_text(cfg: Any) -> str:
    if cfg.lr_schedule == "cosine":
        return "cosine lr"
    return f"step lr at {cfg.lr_step_unit}s {cfg.lr_steps}" + (f" x{cfg.lr_factors}" if cfg.lr_factors else "")


# --------------------------------------------------------------------------- the paper protocol
def ten_crops(x: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, 10, C, crop, crop): the shorter side resized to ``resize`` (antialiased
    bilinear), then torchvision's ``TenCrop`` order: top-left, top-right, bottom-left, bottom-right,
    centre, and the same five of the horizontally mirrored image."""
    from torchvision.transforms.v2 import functional as F

    return torch.stack(F.ten_crop(F.resize(x, [resize], antialias=True), [crop, crop]), 1)


class _TenCropFiles(torch.utils.data.Dataset):
    def __init__(self, split: FileSplit, resize: int, crop: int):
        self.split, self.resize, self.crop = split, resize, crop

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> torch.Tensor:
        return ten_crops(self.split.read(i)[None], self.resize, self.crop)[0]  # (10, 3, crop, crop)


def ten_crop_batches(split: Split | FileSplit, batch_size: int, workers: int = -1, resize: int = 256,
                     crop: int = 224) -> Iterator[torch.Tensor]:
    """uint8 (B, 10, C, S, S) batches of ``split`` in index order: image files as DeepCluster's test
    (Resize(resize) + TenCrop(crop), S = crop); image arrays at their native side S, from the image
    upsampled by resize / crop (the same geometry: the crops cover crop / resize of the side)."""
    from torch.utils.data import DataLoader

    if isinstance(split, Split):
        for xb in eval_batches(split, batch_size):  # (B, C, H, W), the whole images
            side = min(xb.shape[2:])
            yield ten_crops(xb, round(side * resize / crop), side)
        return
    nw = resolve_workers(workers, split)
    yield from DataLoader(_TenCropFiles(split, resize, crop), batch_size=batch_size, num_workers=nw,
                          shuffle=False, prefetch_factor=4 if nw > 0 else None)


def tencrop_scores(logits: torch.Tensor, crops: int = 10) -> torch.Tensor:
    """(B x crops, classes) logits, the crops of an image consecutive -> (B, classes): the softmax
    averaged over the crops (DeepCluster's ``validate`` with ``--tencrops``)."""
    return nn.functional.softmax(logits, 1).view(-1, crops, logits.shape[1]).mean(1)


class _Grab:
    """Forward hooks on the probe points ``layers``: ``grab(x)`` runs the backbone and returns
    {layer: (B, C, H, W) activation}."""

    def __init__(self, backbone: nn.Module, layers: list[str]):
        points = probe_points(backbone)
        unknown = [n for n in layers if n not in points]
        if unknown:
            raise ValueError(f"probe.layers: {unknown[0]!r} is not a stage of this backbone; it has "
                             f"{', '.join(points)}")
        self.backbone, self.got = backbone, {}
        self.hooks = [points[n].register_forward_hook(lambda _m, _i, o, n=n: self.got.__setitem__(n, o))
                      for n in layers]

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.got.clear()
        self.backbone(x)
        return {n: per_image(a, len(x)) for n, a in self.got.items()}  # a patch-grid encoder's: per image

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def paper_heads(acts: dict[str, torch.Tensor], cfg: Any, num_classes: int, g: torch.Generator) -> nn.ModuleDict:
    """Per layer (``acts``: the pooled (B, C, s, s) maps): classifier linear: BatchNorm2d(affine=False) on
    the pooled map (SeLa's and RotNet's probes; the colourisation repo's BatchNorm without scale),
    flattened, then Linear(C s s, classes) with weight N(0, 0.01), bias 0 (the fast probe's init);
    mlp: flattened, then ``mlp_classifier`` (RotNet's MultLayer has no normalisation before it)."""
    from selfsup.eval.linear_probe import mlp_classifier

    heads = {}
    for name, a in acts.items():
        c, s = a.shape[1], a.shape[2]
        if cfg.classifier == "mlp":
            heads[name] = nn.Sequential(nn.Flatten(), mlp_classifier(c * s * s, num_classes, g))
            continue
        fc = nn.Linear(c * s * s, num_classes)
        with torch.no_grad():
            fc.weight.copy_(torch.empty(fc.weight.shape).normal_(0, 0.01, generator=g))
            fc.bias.zero_()
        heads[name] = nn.Sequential(nn.BatchNorm2d(c, affine=False), nn.Flatten(), fc)
    return nn.ModuleDict(heads)


def probe_paper(backbone: nn.Module, data: Any, device: torch.device, cfg: Any, seed: int, names: list[str],
                make: Callable[..., Any], workers: int, resize: int, crop: int, batch_size: int) -> dict[str, Any]:
    """The paper protocol (module docstring) for the layers ``names``, all trained from one backbone
    pass per batch; the test on ten crops."""
    from selfsup.augment.batched import ViewSpec
    from selfsup.core.io import derive_seed
    from selfsup.eval.knn import topk_accuracy

    num_classes = len(data.meta["classes"])
    was = backbone.training
    backbone.eval()  # frozen, BN statistics included
    grab = _Grab(backbone, names)
    spec = ViewSpec(count=1, size=0, crop=True, flip_p=0.5)  # RandomResizedCrop (0.08-1) + flip
    try:
        heads = opt = sched = None
        done = 0  # optimiser steps taken
        losses: dict[str, torch.Tensor] = {}
        steps = cfg.epochs * max(math.ceil(int(data.n_train) / cfg.batch_size), 1)
        for ep in tqdm(range(cfg.epochs), desc="probe (paper)", unit="ep", leave=False, mininterval=2,
                       disable=not dist.is_main()):
            for batch in make([spec], derive_seed(seed, "probe", ep), cfg.batch_size):
                keep = batch.y >= 0
                if int(keep.sum()) < 2:  # batch norm needs two samples
                    continue
                with torch.no_grad():
                    feats = {n: pool(a.float(), cfg.target_dim, cfg.pooling) for n, a in grab(batch.x[keep]).items()}
                if heads is None:  # the layers' shapes are known from the first batch
                    heads = paper_heads(feats, cfg, num_classes, torch.Generator().manual_seed(seed)).to(device)
                    opt = torch.optim.SGD(heads.parameters(), lr=cfg.lr, momentum=0.9, nesterov=cfg.nesterov,
                                          weight_decay=cfg.weight_decay)
                    if cfg.lr_schedule == "cosine":
                        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
                if sched is None:  # step: set before each optimiser step (epoch or iteration milestones)
                    for group in opt.param_groups:
                        group["lr"] = step_lr(cfg, ep, done)
                heads.train()
                losses = {n: nn.functional.cross_entropy(heads[n](f), batch.y[keep]) for n, f in feats.items()}
                loss = sum(losses.values())  # independent heads: each gets its own layer's gradient
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"probe (paper): loss is {loss.item()} (lower probe.lr)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
                if sched is not None:
                    sched.step()
        if heads is None:
            raise ValueError("probe.protocol: paper found no training batch with two labelled images")
        heads.eval()
        hits = {n: np.zeros(2) for n in names}
        n_test, s = 0, 0
        with torch.no_grad():
            for xb in ten_crop_batches(data.test, batch_size, workers, resize, crop):  # (B, 10, C, S, S)
                y = data.test.y[s:s + len(xb)]
                s += len(xb)
                m, b = y >= 0, int((y >= 0).sum())
                if not b:
                    continue
                x = normalize(xb.flatten(0, 1).to(device), data.meta["mean"], data.meta["std"])  # (B x 10, C, S, S)
                for n, a in grab(x).items():
                    p = tencrop_scores(heads[n](pool(a.float(), cfg.target_dim, cfg.pooling))).cpu().numpy()[m]
                    hits[n] += [b * topk_accuracy(p, y[m], 1), b * topk_accuracy(p, y[m], min(5, num_classes))]
                n_test += b
    finally:
        grab.close()
        backbone.train(was)
    res = {}
    for n in names:
        dim = next(m for m in heads[n].modules() if isinstance(m, nn.Linear)).in_features
        res[n] = {"top1": 100.0 * hits[n][0] / n_test, "final_loss": float(losses[n].item()), "dim": int(dim)}
        if num_classes >= 5:
            res[n]["top5"] = 100.0 * hits[n][1] / n_test
    norm = "" if cfg.classifier == "mlp" else "BN(affine=False), "
    return {"layers": res, "protocol": f"paper: {cfg.pooling}-pooled to ~{cfg.target_dim} dims, {norm}"
                                       f"{cfg.classifier}, {_schedule_text(cfg)}, {cfg.epochs} epochs on random "
                                       f"crops, 10-crop test"}

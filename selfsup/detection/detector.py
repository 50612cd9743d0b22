"""Faster R-CNN transfer of a pre-trained backbone (torchvision.models.detection).

The detector around each backbone (``build_detector``):

- ResNets, ``voc.arch: c4`` (MoCo's R50-C4, detectron's C4): conv1 ... layer3 is the
  backbone (stride 16), one feature map for the RPN; RoIAlign 14x14 and layer4 + global
  average pooling are the box head, its output feeds the class / box predictors.
- ResNets, ``voc.arch: fpn``: torchvision's ``BackboneWithFPN`` over layer1..layer4 of our
  trunk (256-channel pyramid + max-pool level), RoIAlign 7x7 over the four maps and
  torchvision's two-layer MLP box head. One anchor size per level, doubling from
  ``anchor_sizes[0]``.
- ``smallcnn`` (the default) and ``alexnet_bn``: the conv trunk without its global pooling
  (smallcnn: stride 2, 128 channels; AlexNet: conv5 without the last max-pool, stride 16,
  256 channels) is a one-map backbone; RoIAlign 7x7 and a two-layer MLP of width
  ``voc.representation`` are the box head (InstDisc's AlexNet Fast R-CNN keeps fc6/fc7
  as that head; here it is new, since our AlexNet's fc layers were trained on 8x8 or
  ImageNet-size crops, not RoIs).

A Sobel front end (DeepCluster's) stays in front of the trunk.

Batch norm (``voc.bn``, MoCo sec. 4.2 shows it matters):

- ``frozen`` (default): every BN becomes torchvision's ``FrozenBatchNorm2d`` with the
  pre-trained statistics and affine parameters (torchvision's and detectron2's default for
  detection; the only sensible choice at our batch of 4 images on one CPU).
- ``train``: BN layers fine-tuned and normalising with the batch statistics (MoCo's
  "SyncBN" on one device).
- ``sync``: ``nn.SyncBatchNorm`` across devices, as MoCo fine-tunes. It needs a
  ``torch.distributed`` multi-process run; the stage is one process, so without an
  initialised process group it stops with an error rather than silently running plain BN.

``voc.freeze_at``: the first stages (stem, then residual layers / conv blocks) kept
fixed, detectron2's FREEZE_AT (its default 2; MoCo's configs use 0).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.resnet import ResNet
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from selfsup.core import dist
from selfsup.core.config import Config, config_hash
from selfsup.detection.config import VocCfg
from selfsup.core.io import ResultCache, derive_seed, folder_digest, sha256_file
from selfsup.models.backbones import NIN, AlexNetBN, Backbone, SmallCNN, ViT, load_backbone, skipped_reason
from selfsup.detection.voc_data import VocDetection, load_split, read_manifest
from selfsup.detection.voc_ap import evaluate_detections

log = logging.getLogger("selfsup.detection.detector")


# --------------------------------------------------------------------------- batch norm
def freeze_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d (recursively) by a FrozenBatchNorm2d holding its statistics."""
    if isinstance(module, nn.BatchNorm2d):
        f = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        f.weight.copy_(module.weight.detach() if module.affine else torch.ones(module.num_features))
        f.bias.copy_(module.bias.detach() if module.affine else torch.zeros(module.num_features))
        f.running_mean.copy_(module.running_mean)
        f.running_var.copy_(module.running_var)
        return f
    for name, child in module.named_children():
        new = freeze_bn(child)
        if new is not child:
            setattr(module, name, new)
    return module


def apply_bn(module: nn.Module, mode: str) -> nn.Module:
    if mode == "frozen":
        return freeze_bn(module)
    if mode == "train":
        return module
    if mode == "sync":
        if dist.world() == 1:
            raise RuntimeError(
                "voc.bn=sync: synchronised batch norm needs several processes (dist.nproc_per_node > 1); "
                "this stage runs one. Use voc.bn=train (the same statistics on one device) or frozen")
        return dist.sync_batch_norm(module, next(module.parameters()).device)
    raise ValueError(f"voc.bn: unknown mode {mode!r}")


# --------------------------------------------------------------------------- detector
def _front(bb: Backbone) -> list[nn.Module]:
    return bb.front()  # input adapter, Sobel


def _freeze(stages: list[nn.Module], n: int) -> None:
    for s in stages[:n]:
        for p in s.parameters():
            p.requires_grad_(False)


class NarrowRPNHead(nn.Module):
    """torchvision's RPNHead with the shared 3x3 conv narrowed to ``width`` channels."""

    def __init__(self, in_channels: int, num_anchors: int, width: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True))
        self.cls_logits = nn.Conv2d(width, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(width, 4 * num_anchors, 1)
        # outputs N(0, 0.01) as torchvision's RPNHead; the narrow conv keeps PyTorch's default
        # (fan-in) init: at N(0, 0.01) a 32-wide conv passes too little signal to learn in 100 steps
        for m in (self.cls_logits, self.bbox_pred):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)

    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, boxes = [], []
        for f in x:  # (B, C, H, W) -> (B, A, H, W), (B, 4A, H, W)
            t = self.conv(f)
            logits.append(self.cls_logits(t))
            boxes.append(self.bbox_pred(t))
        return logits, boxes


class ViTMap(nn.Module):
    """A ViT trunk as a detection backbone: (B, C, H, W) -> (B, D, H / patch, W / patch) patch tokens."""

    def __init__(self, vit: ViT):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.feature_map(x)


def build_detector(bb: Backbone, num_classes: int, cfg: VocCfg, image_mean: list[float],
                   image_std: list[float]) -> FasterRCNN:
    """Faster R-CNN around a pre-trained ``Backbone``; ``num_classes`` excludes the background."""
    trunk = bb.trunk
    rpn_head = None  # torchvision's RPNHead
    sizes, ratios = tuple(cfg.anchor_sizes), tuple(cfg.aspect_ratios)
    if isinstance(trunk, ResNet):
        stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        _freeze([stem, trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4], cfg.freeze_at)
        if cfg.arch == "c4":
            body = nn.Sequential(*_front(bb), stem, trunk.layer1, trunk.layer2, trunk.layer3)
            body.out_channels = _out_channels(trunk.layer3)  # type: ignore[assignment]
            rep = _out_channels(trunk.layer4)
            head: nn.Module = nn.Sequential(trunk.layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (R, rep)
            pool = MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=0)  # detectron2 C4: 14x14
            anchors = AnchorGenerator((sizes,), (ratios,))
            backbone: nn.Module = body
        else:
            chans = [_out_channels(getattr(trunk, f"layer{i}")) for i in range(1, 5)]
            fpn = BackboneWithFPN(trunk, {f"layer{i}": str(i - 1) for i in range(1, 5)}, chans, 256)
            backbone = nn.Sequential(*_front(bb), fpn) if _front(bb) else fpn
            backbone.out_channels = 256  # type: ignore[assignment]
            pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
            rep = cfg.representation
            head = TwoMLPHead(256 * 7 * 7, rep)
            # one size per pyramid level (4 maps + the max-pooled one), doubling per level
            anchors = AnchorGenerator(tuple((sizes[0] * 2 ** i,) for i in range(5)), (ratios,) * 5)
    elif isinstance(trunk, (SmallCNN, AlexNetBN, NIN, ViT)):  # one feature map + an MLP box head
        if isinstance(trunk, ViT):
            # a plain single-scale backbone (the simplest of ViTDet, Li et al. 2022): the patch tokens after
            # the final norm as one stride-``patch`` map; ``freeze_at`` does not apply (every block trains)
            layers: list[nn.Module] = [ViTMap(trunk)]
            out = trunk.out_dim
        else:
            if isinstance(trunk, SmallCNN):
                layers = list(trunk.net)[:-2]  # drop global pooling + flatten: (B, 128, H/2, W/2)
                out = trunk.out_dim
            elif isinstance(trunk, NIN):
                layers = list(trunk.blocks)  # every block, without the global pooling: (B, 192, H/8, W/8)
                out = trunk.out_dim
            else:
                layers = list(trunk.features)[:-1]  # conv5 without its max-pool: (B, 256, H/16, W/16)
                out = 256
            _freeze(layers if isinstance(trunk, NIN) else _conv_blocks(layers), cfg.freeze_at)
        backbone = nn.Sequential(*_front(bb), *layers)
        backbone.out_channels = out  # type: ignore[assignment]
        rep = cfg.representation
        head = TwoMLPHead(out * 7 * 7, rep)
        # one bilinear sample per bin (torchvision: 2x2): RoIAlign's CPU backward dominates a step
        pool = MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=1)
        anchors = AnchorGenerator((sizes,), (ratios,))
        if cfg.rpn_channels:
            rpn_head = NarrowRPNHead(out, anchors.num_anchors_per_location()[0], cfg.rpn_channels)
    else:
        raise TypeError(f"no detector for a {type(trunk).__name__} backbone")
    backbone = apply_bn(backbone, cfg.bn)
    head = apply_bn(head, cfg.bn)  # C4: layer4's BN
    train_n, test_n = cfg.rpn_proposals
    return FasterRCNN(
        backbone, num_classes=None, min_size=cfg.min_size, max_size=cfg.max_size,
        image_mean=list(image_mean), image_std=list(image_std),
        rpn_anchor_generator=anchors, rpn_head=rpn_head, rpn_pre_nms_top_n_train=2 * train_n, rpn_post_nms_top_n_train=train_n,
        rpn_pre_nms_top_n_test=2 * test_n, rpn_post_nms_top_n_test=test_n,
        box_roi_pool=pool, box_head=head, box_predictor=FastRCNNPredictor(rep, num_classes + 1),
        box_batch_size_per_image=cfg.roi_batch, box_score_thresh=cfg.score_thresh, box_detections_per_img=cfg.detections,
    )


def _out_channels(layer: nn.Sequential) -> int:
    last = list(layer.children())[-1]
    conv = last.conv3 if hasattr(last, "conv3") else last.conv2  # Bottleneck / BasicBlock
    return int(conv.out_channels)


def _conv_blocks(layers: list[nn.Module]) -> list[nn.Module]:
    """Group a flat conv-BN-ReLU list into one module per conv (the 'stages' freeze_at counts)."""
    blocks: list[list[nn.Module]] = []
    for m in layers:
        if isinstance(m, nn.Conv2d) or not blocks:
            blocks.append([])
        blocks[-1].append(m)
    return [nn.Sequential(*b) for b in blocks]


# --------------------------------------------------------------------------- train / evaluate
def _collate(batch: list[Any]) -> tuple[Any, ...]:
    return tuple(zip(*batch))


def lr_at(cfg: VocCfg, step: int) -> float:
    """Linear warm-up from lr / 1000 (detectron2's WARMUP_FACTOR), then x0.1 at each lr_steps."""
    f = 0.1 ** sum(step >= s for s in cfg.lr_steps)
    if step < cfg.warmup_steps:
        a = step / cfg.warmup_steps
        f *= 0.001 * (1 - a) + a
    return cfg.lr * f


class _RankBatches(torch.utils.data.Sampler):
    """Global batches of ``batch`` images from a seeded shuffle, the same on every rank (one epoch per
    pass); rank r takes its contiguous ``batch / world`` of each (one process: all of it)."""

    def __init__(self, n: int, batch: int, generator: torch.Generator):
        self.n, self.batch, self.world, self.rank = n, batch, dist.world(), dist.rank()
        self.g = generator
        self.full = n >= batch  # drop a short last batch when there is a full one (as drop_last)

    def __len__(self) -> int:
        return self.n // self.batch if self.full else 1

    def __iter__(self) -> Any:
        perm = torch.randperm(self.n, generator=self.g).tolist()
        per = self.batch // self.world
        for s in range(len(self)):
            glob = perm[s * self.batch:(s + 1) * self.batch]
            yield glob[self.rank * per:(self.rank + 1) * per] if self.world > 1 else glob
        torch.randperm(self.n, generator=self.g)  # RandomSampler's trailing (empty) slice, see voc_loader


def voc_loader(ds: Any, batch: int, seed: int) -> torch.utils.data.DataLoader:
    """This rank's training batches. With one process it draws exactly what the earlier
    DataLoader(shuffle=True, generator=g, drop_last) drew: the loader's own int64 (its workers'
    base seed, from the generator it is given, not the global RNG the detector samples RoIs with),
    the permutation, and the sampler's trailing permutation when it is exhausted."""
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_sampler=_RankBatches(len(ds), batch, g), generator=g,
                                       collate_fn=_collate, num_workers=0)


def train_detector(model: FasterRCNN, ds: VocDetection, cfg: VocCfg, seed: int,
                   device: torch.device) -> list[dict[str, float]]:
    """SGD fine-tuning for ``cfg.steps`` iterations; returns a per-step loss history. Several
    processes: DDP, ``voc.batch_size`` is the global batch (MoCo's 16 = 2 per GPU on 8), split across
    the ranks; with ``voc.bn: sync`` the batch norm is synchronised over them."""
    if cfg.batch_size % dist.world():
        raise ValueError(f"voc.batch_size: {cfg.batch_size} images do not split over {dist.world()} processes")
    loader = voc_loader(ds, cfg.batch_size, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    model.to(device).train()
    net: nn.Module = model
    if dist.world() > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    history: list[dict[str, float]] = []
    step = 0
    while step < cfg.steps:
        for imgs, targets in loader:
            if step >= cfg.steps:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step)
            imgs = [i.to(device) for i in imgs]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            losses = net(imgs, targets)  # loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg
            loss = sum(losses.values())
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"voc: loss is {float(loss)} at step {step} ({ {k: float(v) for k, v in losses.items()} })")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append({"step": step + 1, "loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}})
            step += 1
    return history


@torch.no_grad()
def detect(model: FasterRCNN, ds: VocDetection, device: torch.device, batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    """Detections per image, boxes in the devkit's 1-based inclusive pixel coordinates."""
    model.to(device).eval()
    out = []
    for s in range(0, len(ds), batch_size):
        imgs = [ds[i][0].to(device) for i in range(s, min(s + batch_size, len(ds)))]
        for r in model(imgs):
            b = r["boxes"].cpu().numpy().astype(np.float64)  # (D, 4) 0-based continuous
            b[:, :2] += 1.0  # back to the devkit's convention (the inverse of the loader's xmin - 1)
            out.append({"boxes": b, "scores": r["scores"].cpu().numpy(), "labels": r["labels"].cpu().numpy()})
    return out


def run_voc(backbone: Backbone, voc_dir: str | Path, image_mean: list[float], image_std: list[float],
            cfg: VocCfg, seed: int, device: torch.device) -> dict[str, Any] | None:
    """Fine-tune a detector on VOC trainval and evaluate on test.

    Returns {"summary": map50 / map50_area / ap / ap75 (percent) + counts and seconds,
    "per_class": rows, "history": per-step losses}; None on ranks other than 0.
    """
    t0 = time.perf_counter()
    man = read_manifest(voc_dir)
    classes = man["classes"]
    channels = backbone.in_channels
    if len(image_mean) != channels:
        raise ValueError(f"image_mean has {len(image_mean)} channels, the backbone takes {channels}")
    torch.manual_seed(seed)  # the new heads' initialisation
    model = build_detector(backbone, len(classes), cfg, image_mean, image_std)
    train = VocDetection(load_split(man, "trainval", voc_dir), classes, channels,
                         keep_difficult=cfg.train_difficult, flip=cfg.flip, seed=seed)
    test = VocDetection(load_split(man, "test", voc_dir), classes, channels)
    history = train_detector(model, train, cfg, seed, device)
    if not dist.is_main():  # several processes: rank 0 evaluates
        return None
    t1 = time.perf_counter()
    dets = detect(model, test, device)
    gts = []
    cidx = {c: i + 1 for i, c in enumerate(classes)}
    for _, ann in test.records:
        gts.append({"boxes": np.array([o.bbox for o in ann.objects], np.float64).reshape(-1, 4),
                    "labels": np.array([cidx[o.name] for o in ann.objects], np.int64),
                    "difficult": np.array([bool(o.difficult) for o in ann.objects], bool)})
    summary, rows = evaluate_detections(dets, gts, classes, cfg.ap_metric, cfg.iou_compare)
    summary.update({
        "n_trainval": len(train), "n_test": len(test), "classes": len(classes), "steps": len(history),
        "final_loss": float(np.mean([h["loss"] for h in history[-10:]])) if history else float("nan"),
        "train_seconds": t1 - t0, "eval_seconds": time.perf_counter() - t1,
    })
    log.info("voc: mAP50 %.1f (11-point) %.1f (area), AP %.1f, AP75 %.1f; %d steps in %.1fs",
             summary["map50"], summary["map50_area"], summary["ap"], summary["ap75"], len(history), t1 - t0)
    return {"summary": summary, "per_class": rows, "history": history}


def transfer_all(cfg: Config, models: dict[str, Path], voc_dir: str | Path, image_mean: list[float],
                 image_std: list[float], device: torch.device, cache_dir: str | Path) -> Iterator[tuple[str, dict[str, Any] | None, bool]]:
    """Detection transfer of every method's backbone in one process (the ``voc`` stage): yields
    (method, {"summary", "per_class"} or None on ranks other than 0, reused).

    A method's result is reused from ``cache_dir`` (``selfsup.core.io.ResultCache``) while its key is
    unchanged: the model file's content, ``voc:``, the seed, the device type and number of processes,
    the code the stage runs, the detection data's content (never its mtimes) and the normalisation. So a new model of
    one method re-runs one detector, a changed ``voc`` key all of them. All ranks compute the same keys
    (same files), so they skip or train the same methods together.
    """
    from selfsup.core.codedeps import closure, code_hash

    cache = ResultCache(cache_dir)
    base = {"voc": config_hash(cfg.voc), "seed": cfg.seed, "device": device.type,
            "procs": cfg.dist.nproc_per_node * cfg.dist.nnodes, "code": code_hash(closure("stages/voc.py")),
            "data": folder_digest(voc_dir), "norm": [image_mean, image_std]}
    for name, path in models.items():
        if reason := skipped_reason(path):  # the method did not train on this data: no detector, the row says why
            yield name, {"summary": {"steps": 0, "seconds": 0.0, "skipped": reason}, "per_class": []}, False
            continue
        key = config_hash({**base, "method": name, "model": sha256_file(path)})
        hit = cache.get(name, key)
        if hit is not None:
            log.info("voc %s: model, params, code and data unchanged: result reused (%s)", name, cache.folder)
            yield name, hit, True
            continue
        t0 = time.perf_counter()
        out = run_voc(load_backbone(path, device), voc_dir, image_mean, image_std, cfg.voc,
                      derive_seed(cfg.seed, "voc", name), device)
        if out is None:
            yield name, None, False
            continue
        result = {"summary": {**out["summary"], "seconds": time.perf_counter() - t0}, "per_class": out["per_class"]}
        cache.put(name, key, result)
        yield name, result, False

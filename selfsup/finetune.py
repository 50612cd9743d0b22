"""End-to-end fine-tuning evaluation: the pretrained backbone plus a linear classifier, all of it trained on
the labelled training split, test top-1 at the end (BEiT sec. 3.1 / MAE sec. 4: the protocol masked image
modelling is judged by, where a linear probe under-rates it; run here for every method).

The recipe is the MAE / BEiT fine-tuning code's (``main_finetune.py``, ``util/lr_decay.py``), each part a
param of ``finetune:`` so the papers' settings are a preset away:

- AdamW (or SGD) with a per-step linear warm-up then half-cosine, lr = ``lr`` x global batch / 256
  (MAE's ``blr``; ``lr_scaling``);
- layer-wise learning-rate decay for Vision Transformers (BEiT sec. 2.6, "layer-wise learning rate
  decay"): layer i of L gets lr x ``layer_decay`` ^ (L + 1 - i), the patch / CLS / position embeddings
  are layer 0 and the classifier and final norm layer L + 1 (MAE's ``param_groups_lrd``); conv nets
  are fine-tuned at one lr (the papers tune ResNets that way), so the key only acts on ViTs;
- no weight decay on biases, norms, the CLS token and the position embedding (MAE's ``no_weight_decay``);
- stochastic depth for ViTs (``drop_path``: MAE's and BEiT's 0.1, rising linearly over the blocks);
- label smoothing, mixup and CutMix (Zhang et al. 2018; Yun et al. 2019) on soft targets, one of the
  two per batch with probability ``mix_switch_p`` when both are on (timm's ``Mixup``, which the MAE
  code uses; its per-element modes and RandAugment / random erasing are not reproduced: said in the
  README);
- the classifier: ``Linear(D, classes)``, weights N(0, 0.01) (MAE: trunc-normal 2e-5 after a BN), bias 0.

Test: the centre-crop eval transform of the other evaluations, the whole network in eval mode.
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from selfsup.augment import ViewSpec
from selfsup.io import derive_seed
from selfsup.knn import topk_accuracy

_BLOCK = re.compile(r"\.encoder\.layers\.encoder_layer_(\d+)\.")
_EMBED = (".conv_proj.", ".class_token", ".pos_embedding")


def vit_layer_id(name: str, depth: int) -> int:
    """Layer id of a parameter of a ``Backbone`` with a ``selfsup.models.ViT`` trunk (``fc.*`` is the
    classifier): embeddings 0, block i (0-based) i + 1, the final norm and the classifier depth + 1."""
    if any(k in name for k in _EMBED):
        return 0
    m = _BLOCK.search(name)
    return int(m.group(1)) + 1 if m else depth + 1


def param_groups_lrd(model: nn.Module, weight_decay: float, layer_decay: float, depth: int | None
                     ) -> list[dict[str, Any]]:
    """Parameter groups of ``model`` (``backbone`` + ``fc``): (layer, decayed or not) -> {params,
    weight_decay, lr_scale}; ``depth`` None (a conv net): every lr_scale is 1."""
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name.endswith((".class_token", ".pos_embedding"))
        layer = 0 if depth is None else vit_layer_id(name, depth)
        scale = 1.0 if depth is None else layer_decay ** (depth + 1 - layer)
        g = groups.setdefault((layer, no_wd), {"params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                                               "lr_scale": scale, "lars_exclude": no_wd})
        g["params"].append(p)
    return list(groups.values())


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: Any, g: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed x (B, C, H, W), soft targets (B, classes)): label smoothing, then mixup or CutMix with the
    batch reversed (timm's ``Mixup`` pairing), lambda ~ Beta(alpha, alpha); CutMix's lambda is corrected
    to the box's true area."""
    off = c.label_smoothing / num_classes
    t = torch.full((len(y), num_classes), off, device=x.device)
    t.scatter_(1, y[:, None], 1.0 - c.label_smoothing + off)  # (B, classes)
    use_mix, use_cut = c.mixup > 0, c.cutmix > 0
    if not (use_mix or use_cut):
        return x, t
    if use_mix and use_cut:
        use_cut = bool(torch.rand((), generator=g) < c.mix_switch_p)
        use_mix = not use_cut
    alpha = c.cutmix if use_cut else c.mixup
    lam = float(np.random.default_rng(int(torch.randint(2**31, (), generator=g))).beta(alpha, alpha))
    if use_cut:  # a box of area (1 - lam) of the image from the paired sample
        h, w = x.shape[-2:]
        rh, rw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(h, (), generator=g)), int(torch.randint(w, (), generator=g))
        y0, y1 = max(cy - rh // 2, 0), min(cy + rh // 2, h)
        x0, x1 = max(cx - rw // 2, 0), min(cx + rw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = lam * x + (1.0 - lam) * x.flip(0)
    return x, lam * t + (1.0 - lam) * t.flip(0)


def finetune(backbone: nn.Module, data: Any, cfg: Any, device: torch.device, seed: int,
             head: tuple[nn.Module, int] | None = None) -> dict[str, Any]:
    """Fine-tune ``backbone`` (a loaded ``selfsup.models.Backbone``, changed in place) with a new linear
    classifier on ``data``'s labelled training split as ``cfg.finetune`` says; returns {top1, top5,
    final_loss, protocol} on the test split. ``head``: (the hidden layers of the method's projection head
    fine-tuned between the backbone and the classifier, their output width) (SimCLR v2 sec. 2:
    ``finetune.head_layers``, ``selfsup.heads.hidden_layers``); None: the classifier reads the backbone."""
    from selfsup.features import extract_features
    from selfsup.models import vit_trunk
    from selfsup.optim import build_optimizer
    from selfsup.schedules import lr_scale
    from selfsup.train import batch_maker  # the training loop's loader + device augmentation

    c = cfg.finetune
    num_classes = len(data.meta["classes"])
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout inside the ViT blocks
    model = nn.Module()
    model.backbone = backbone
    model.head = head[0] if head is not None else nn.Identity()  # ViT layer decay: the classifier's layer
    model.fc = nn.Linear(head[1] if head is not None else backbone.out_dim, num_classes)
    with torch.no_grad():
        model.fc.weight.copy_(torch.empty(model.fc.weight.shape).normal_(0, 0.01, generator=g))
        model.fc.bias.zero_()
    model.to(device)
    for p in model.parameters():  # everything trains, a frozen patch projection included
        p.requires_grad_(True)
    for m in backbone.front():  # but not the fixed front end (Sobel, colourisation's L adapter)
        for p in m.parameters():
            p.requires_grad_(False)
    vit = vit_trunk(backbone)
    depth = len(vit.vit.encoder.layers) if vit is not None else None
    if vit is not None:
        vit.set_drop_path(c.drop_path)
    groups = param_groups_lrd(model, c.weight_decay, c.layer_decay, depth)
    base_lr = c.lr * lr_scale(c.lr_scaling, c.batch_size, 256)
    opt = build_optimizer(groups, c)
    spec = ViewSpec(count=1, size=0, crop=True, scale=tuple(c.crop_scale), flip_p=0.5 if c.flip else 0.0)
    make = batch_maker(cfg, data, device)
    steps_per_epoch = max(math.ceil(int((data.train.y >= 0).sum()) / c.batch_size), 1)
    total, warm = c.epochs * steps_per_epoch, c.warmup_epochs * steps_per_epoch
    step, loss = 0, torch.tensor(math.nan)
    for ep in tqdm(range(c.epochs), desc="finetune", unit="ep", leave=False, mininterval=2):
        model.train()
        for batch in make([spec], derive_seed(seed, "finetune", ep), c.batch_size):
            keep = batch.y >= 0
            if not keep.any():
                continue
            lr = base_lr * (step / warm if step < warm else
                            0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1))))
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            x, t = mix_batch(batch.x[keep], batch.y[keep], num_classes, c, g)
            logits = model.fc(model.head(backbone(x)).float())  # (b, classes)
            loss = -(t * F.log_softmax(logits, 1)).sum(1).mean()  # cross-entropy on soft targets
            if not torch.isfinite(loss):
                raise FloatingPointError(f"finetune: loss is {loss.item()} at epoch {ep} (lower finetune.lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    net = nn.Sequential(backbone, model.head, model.fc)
    m = data.test.y >= 0
    logits = extract_features(net, data.test, data.meta, device, cfg.extract.batch_size, desc="finetune test",
                              workers=cfg.workers, resize=cfg.dataset.resize_size, crop=cfg.dataset.crop_size)
    out = {"top1": 100.0 * topk_accuracy(logits[m], data.test.y[m], 1), "final_loss": float(loss.item()),
           "protocol": (f"fine-tuning: {c.optimizer} lr {c.lr} x B/256, {c.epochs} epochs, layer decay "
                        f"{c.layer_decay if depth else 'n/a (conv net)'}, drop path {c.drop_path if depth else 'n/a'}, "
                        f"smoothing {c.label_smoothing}, "
                        f"mixup {c.mixup}, cutmix {c.cutmix}"
                        + (f", from hidden layer {len([m for m in model.head if isinstance(m, nn.ReLU)])} of the "
                           "projection head" if head is not None else ""))}
    if num_classes >= 5:
        out["top5"] = 100.0 * topk_accuracy(logits[m], data.test.y[m], 5)
    return out

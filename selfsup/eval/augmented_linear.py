"""MoCo's linear classification protocol (``main_lincls.py``): a linear classifier on the frozen
backbone, trained on freshly augmented views every epoch (random resized crop + flip), SGD with a
large learning rate (30) and x0.1 steps (epochs 60 and 80 of 100), no weight decay; the backbone in
eval mode (frozen batch norm); the test on the centre crop (the extracted eval features).

The later papers' scripts keep that loop and change the optimisation (``linear.*``): a half-cosine
per epoch to 0 (``lr_schedule: cosine``: facebookresearch/moco-v3 and simsiam ``main_lincls.py``
``adjust_learning_rate``, swav ``eval_linear.py`` CosineAnnealingLR stepped per epoch; BYOL's
``eval_experiment.py`` evaluates its cosine per step), Nesterov momentum (``nesterov``: BYOL's
``configs/eval.py``), and apex LARC over the SGD (``optimizer: lars``: SimSiam's ``--lars``, trust
coefficient 0.001, clip False, on the weight and the bias alike: ``selfsup.engine.optim.LARS`` rule larc).

The fast protocol of ``selfsup.eval.linear_probe`` trains on features extracted once and standardised; this
one costs a backbone pass per epoch, as the papers' ImageNet tables do.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from selfsup.augment.batched import ViewSpec
from selfsup.core.io import derive_seed
from selfsup.eval.knn import topk_accuracy


def lincls_lr(c: Any, base: float, epoch: int) -> float:
    """The lr of (0-based) ``epoch`` (``c``: the ``linear`` block): step, base x 0.1 per milestone of
    ``lr_steps`` passed (MoCo's adjust_learning_rate); cosine, base x 0.5 (1 + cos(pi epoch / epochs))
    (MoCo v3's and SimSiam's adjust_learning_rate; torch's CosineAnnealingLR(epochs, eta_min=0) per epoch,
    SwAV's)."""
    if c.lr_schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * epoch / c.epochs))
    return base * 0.1 ** sum(epoch >= s for s in c.lr_steps)


def lincls_optimizer(params: list[nn.Parameter], c: Any, base: float) -> torch.optim.Optimizer:
    """SGD momentum 0.9 (Nesterov with ``c.nesterov``) with ``c.weight_decay``, or (``c.optimizer: lars``)
    apex LARC, trust coefficient 0.001, clip False, around that SGD (SimSiam's main_lincls.py)."""
    from selfsup.engine.optim import LARS

    if c.optimizer == "lars":
        return LARS(params, lr=base, momentum=0.9, weight_decay=c.weight_decay, eta=0.001, rule="larc")
    return torch.optim.SGD(params, lr=base, momentum=0.9, nesterov=c.nesterov, weight_decay=c.weight_decay)


def augmented_linear_probe(backbone: nn.Module, data: Any, cfg: Any, test_feats: np.ndarray, test_y: np.ndarray,
                           device: torch.device, seed: int) -> dict[str, Any]:
    """Train ``nn.Linear(D, classes)`` on ``backbone(augmented view)`` (``cfg``: the whole Config; its
    ``linear`` block: epochs, batch_size, lr, lr_schedule, lr_steps, optimizer, nesterov, weight_decay,
    crop_scale); evaluate on
    ``test_feats`` (N, D), the backbone's eval-transform features."""
    from selfsup.engine.schedules import lr_scale
    from selfsup.data.batches import batch_maker  # the training loop's loader + device augmentation

    c = cfg.linear
    num_classes = len(data.meta["classes"])
    spec = ViewSpec(count=1, size=0, crop=True, scale=tuple(c.crop_scale), flip_p=0.5 if c.flip else 0.0)
    make = batch_maker(cfg, data, device)
    backbone.eval()  # frozen, BN statistics included (MoCo: model.eval() during the classifier's training)
    for p in backbone.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    fc = nn.Linear(test_feats.shape[1], num_classes).to(device)
    with torch.no_grad():  # MoCo: fc.weight ~ N(0, 0.01), bias 0
        fc.weight.copy_(torch.empty(fc.weight.shape).normal_(0, 0.01, generator=g))
        fc.bias.zero_()
    base = c.lr * lr_scale(c.lr_scaling, c.batch_size, 256)  # none: c.lr (MoCo's lr 30 is unscaled)
    opt = lincls_optimizer(list(fc.parameters()), c, base)
    loss = torch.tensor(0.0)
    for ep in tqdm(range(c.epochs), desc="linear (augmented)", unit="ep", leave=False, mininterval=2):
        for group in opt.param_groups:  # set at each epoch's start, as the official adjust_learning_rate
            group["lr"] = lincls_lr(c, base, ep)
        for batch in make([spec], derive_seed(seed, "lincls", ep), c.batch_size):
            keep = batch.y >= 0
            if not keep.any():
                continue
            with torch.no_grad():
                f = backbone(batch.x[keep]).float()  # (b, D)
            loss = nn.functional.cross_entropy(fc(f), batch.y[keep])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"linear (augmented): loss is {loss.item()} (lower linear.lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    m = test_y >= 0
    with torch.no_grad():
        s_te = fc(torch.from_numpy(test_feats[m]).to(device)).cpu().numpy()  # (M, classes)
    out = {"top1": 100.0 * topk_accuracy(s_te, test_y[m], 1), "final_loss": float(loss.item()),
           "protocol": f"augmented (MoCo): {c.optimizer}{' nesterov' if c.nesterov else ''} lr {c.lr}, "
                       f"{c.lr_schedule if c.lr_schedule == 'cosine' else f'steps {c.lr_steps}'}, {c.epochs} epochs"}
    if num_classes >= 5:
        out["top5"] = 100.0 * topk_accuracy(s_te, test_y[m], 5)
    return out

"""The papers' linear probes of Vision Transformers, each a named ``linear.protocol``:

- ``mae``: facebookresearch/mae ``main_linprobe.py``: the CLS token after the final norm (``global_pool``
  off), ``BatchNorm1d(affine=False, eps=1e-6)`` then ``Linear`` (weight trunc-normal std 0.01, bias 0),
  MAE's LARS (``util/lars.py``; weight decay 0), lr = blr x B / 256 (blr 0.1), a linear warm-up then a
  half-cosine to 0 set every step (``util/lr_sched.py``, ``warmup_epochs`` 10 of 90), incomplete last
  batches dropped (``drop_last=True``);
- ``dino``: facebookresearch/dino ``eval_linear.py``: the CLS tokens of the last ``n_last_blocks`` blocks,
  each through the final norm (``get_intermediate_layers``), concatenated, plus with
  ``avgpool_patchtokens`` the mean of the last block's normed patch tokens (ViT-S: 4 blocks; ViT-B: 1 +
  avgpool); ``Linear`` (weight N(0, 0.01), bias 0), SGD momentum 0.9, weight decay 0, lr 0.001 x B / 256,
  ``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped per epoch, 100 epochs;
- ``beit``: microsoft/unilm ``beit/run_linear_eval.py``: one ``Linear`` per block (N(0, 0.01), bias 0) on
  [CLS, mean patch token] of the block's output (no final norm: BEiT's ``get_intermediate_layers``), the
  losses summed, AdamW (weight decay 1e-4), the README's lr 4e-3 unscaled (``lr_scaling: none``), cosine
  per epoch; the result is the best block's, as the script reports (its maximum over classifiers).

All three train on a fresh ``RandomResizedCrop`` + flip of every training image each epoch through the
frozen backbone in eval mode, and test on the centre crop (the eval transform). Differences from the
official code: the features are computed in fp32 (BEiT's ``amp_forward`` and MAE's loop use autocast);
the accuracy is the last epoch's (the scripts also print the best epoch's); DINO with
``avgpool_patchtokens`` orders the dimensions as [CLS..., mean] where its code interleaves them (a
permutation of the inputs of a linear layer with i.i.d. init), and allows ``n_last_blocks`` > 1 with it
(DINO's concatenation fails there); eval resizing is antialiased bilinear (the scripts: bicubic).

Conv nets: the backbone's pooled output, the linear head, optimiser and schedule of the protocol
(DINO's ``eval_linear.py`` does that for torchvision ResNets; MAE and BEiT have no conv path).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from selfsup.augment.batched import ViewSpec
from selfsup.core.config import ConfigError
from selfsup.core.io import derive_seed
from selfsup.eval.knn import topk_accuracy

PROTOCOLS = ("mae", "dino", "beit")
SOURCE = {"mae": "facebookresearch/mae main_linprobe.py", "dino": "facebookresearch/dino eval_linear.py",
          "beit": "microsoft/unilm beit/run_linear_eval.py"}


class MaeLARS(torch.optim.Optimizer):
    """MAE's LARS (facebookresearch/mae ``util/lars.py``): for tensors of more than one dimension
    d = g + wd w scaled by the trust ratio ``trust_coefficient`` ||w|| / ||d|| (1 where a norm is 0);
    biases and norm parameters take the plain gradient, no weight decay; momentum on the unscaled step,
    mu <- m mu + d, w <- w - lr mu. (``selfsup.engine.optim.LARS``, SimCLR's, keeps the lr inside the momentum
    buffer instead: the two differ whenever the lr changes, as under MAE's warm-up and cosine.)"""

    def __init__(self, params: Iterable[Any], lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: ARG002 (the torch interface)
        for g in self.param_groups:
            for p in g["params"]:
                d = p.grad
                if d is None:
                    continue
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = torch.norm(p), torch.norm(d)
                    one = torch.ones_like(w_norm)
                    trust = torch.where(d_norm > 0, g["trust_coefficient"] * w_norm / d_norm, one)
                    d = d.mul(torch.where(w_norm > 0.0, trust, one))
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(d)
                p.add_(mu, alpha=-g["lr"])


def vit_probe_features(vit: Any, x: torch.Tensor, protocol: str, n_last_blocks: int = 1,
                       avgpool: bool = False) -> list[torch.Tensor]:
    """A ``selfsup.models.backbones.ViT``'s features for ``protocol`` on normalised images x (B, C, H, W): one
    (B, D') tensor per classifier (dino, mae: one; beit: one per block)."""
    if protocol == "mae":
        return [vit(x)]  # (B, D): the CLS token after the final norm
    blocks = vit.block_tokens(x)  # depth x (B, 1 + h w, D), before the final norm
    if protocol == "dino":  # get_intermediate_layers(x, n): the final norm on each of the last n
        normed = [vit.norm(t) for t in blocks[-n_last_blocks:]]
        f = [t[:, 0] for t in normed] + ([normed[-1][:, 1:].mean(1)] if avgpool else [])
        return [torch.cat(f, -1)]  # (B, D (n + avgpool))
    return [torch.cat([t[:, 0], t[:, 1:].mean(1)], -1) for t in blocks]  # beit: depth x (B, 2 D)


def probe_features(backbone: nn.Module, x: torch.Tensor, c: Any) -> list[torch.Tensor]:
    """``backbone``'s features for the protocol of ``c`` (the ``linear`` block); conv nets: [its output]."""
    from selfsup.models.backbones import vit_trunk

    vit = vit_trunk(backbone)
    if vit is None:
        return [backbone(x)]  # (B, D)
    for m in backbone.front():
        x = m(x)
    return vit_probe_features(vit, x, c.protocol, c.n_last_blocks, c.avgpool_patchtokens)


def feature_dims(backbone: nn.Module, c: Any) -> list[int]:
    """The width of each classifier's input (``probe_features``), checked against the ViT's depth."""
    from selfsup.models.backbones import vit_trunk

    vit = vit_trunk(backbone)
    if vit is None or c.protocol == "mae":
        return [backbone.out_dim]
    depth, d = len(vit.vit.encoder.layers), vit.out_dim
    if c.protocol == "dino":
        if c.n_last_blocks > depth:
            raise ConfigError(f"linear.n_last_blocks: {c.n_last_blocks} blocks asked, the ViT has {depth}")
        return [d * (c.n_last_blocks + int(c.avgpool_patchtokens))]
    return [2 * d] * depth


def make_heads(protocol: str, dims: list[int], num_classes: int, g: torch.Generator) -> nn.ModuleList:
    """One classifier per feature tensor: weight N(0, 0.01) (MAE: trunc_normal_ std 0.01, cut at +-2:
    never reached), bias 0; MAE's is preceded by ``BatchNorm1d(affine=False, eps=1e-6)``."""
    heads = []
    for d in dims:
        fc = nn.Linear(d, num_classes)
        with torch.no_grad():
            fc.weight.copy_(torch.empty(fc.weight.shape).normal_(0, 0.01, generator=g))
            fc.bias.zero_()
        heads.append(nn.Sequential(nn.BatchNorm1d(d, affine=False, eps=1e-6), fc) if protocol == "mae" else fc)
    return nn.ModuleList(heads)


def make_optimizer(protocol: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float
                   ) -> torch.optim.Optimizer:
    if protocol == "mae":
        return MaeLARS(params, lr=lr, weight_decay=weight_decay)
    if protocol == "dino":
        return torch.optim.SGD(params, lr, momentum=0.9, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr, weight_decay=weight_decay)  # beit: torch's betas and eps, as the script


def lr_at(base: float, epochs: int, warmup: float, t: float) -> float:
    """The lr at (fractional) epoch t: linear from 0 over ``warmup`` epochs, then a half-cosine to 0 at
    ``epochs`` (MAE's ``adjust_learning_rate`` with min_lr 0; with no warm-up and whole t, the closed
    form of ``CosineAnnealingLR(T_max=epochs, eta_min=0)``, DINO's and BEiT's)."""
    if t < warmup:
        return base * t / warmup
    return base * 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / (epochs - warmup)))


def schedule_time(protocol: str, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Where the schedule is read: MAE every step (epoch + step / steps per epoch); DINO and BEiT step
    their scheduler once per epoch."""
    return epoch + step / steps_per_epoch if protocol == "mae" else float(epoch)


def train_step(heads: nn.ModuleList, opt: torch.optim.Optimizer, feats: list[torch.Tensor], y: torch.Tensor,
               lr: float) -> torch.Tensor:
    """One step of every classifier on its features (B, D_k), the cross-entropies summed (BEiT sums its
    per-block losses; independent parameters, so each classifier gets its own gradient)."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss = sum(nn.functional.cross_entropy(h(f.float()), y) for h, f in zip(heads, feats))
    if not torch.isfinite(loss):
        raise FloatingPointError(f"linear probe: loss is {loss.item()} (lower linear.lr)")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


@torch.no_grad()
def test_accuracy(backbone: nn.Module, heads: nn.ModuleList, data: Any, cfg: Any, device: torch.device
                  ) -> list[tuple[float, float]]:
    """(top-1, top-5) in percent of each classifier on the labelled test images (centre crop)."""
    from selfsup.models.features import normalize
    from selfsup.data.loader import eval_batches

    heads.eval()
    y_all = data.test.y
    hits = np.zeros((len(heads), 2))
    n, s = 0, 0
    for xb in eval_batches(data.test, cfg.extract.batch_size, cfg.workers, cfg.dataset.resize_size,
                           cfg.dataset.crop_size):
        y = y_all[s:s + len(xb)]
        s += len(xb)
        m = y >= 0
        if not m.any():
            continue
        feats = probe_features(backbone, normalize(xb.to(device), data.meta["mean"], data.meta["std"]), cfg.linear)
        b = int(m.sum())
        for k, (h, f) in enumerate(zip(heads, feats)):
            scores = h(f.float()).cpu().numpy()[m]  # (b, classes)
            hits[k] += [b * topk_accuracy(scores, y[m], 1), b * topk_accuracy(scores, y[m], min(5, scores.shape[1]))]
        n += b
    return [(100.0 * a / n, 100.0 * b / n) for a, b in hits]


def paper_linear_probe(backbone: nn.Module, data: Any, cfg: Any, device: torch.device, seed: int) -> dict[str, Any]:
    """Train the classifiers of ``cfg.linear.protocol`` (mae | dino | beit) on the frozen ``backbone``
    (a loaded ``selfsup.models.backbones.Backbone``) and test them: {top1, top5, final_loss, protocol}; beit adds
    {blocks: {blockK: top-1}, best_block}. Runs in one process (rank 0 of the evaluate stage)."""
    from selfsup.engine.schedules import lr_scale
    from selfsup.data.batches import batch_maker  # the training loop's loader + device augmentation

    c = cfg.linear
    num_classes = len(data.meta["classes"])
    n_train = int(data.n_train)
    drop_last = c.protocol == "mae"  # MAE's DataLoader(drop_last=True); BatchNorm needs 2 samples
    if drop_last and n_train < c.batch_size:
        raise ConfigError(f"linear.batch_size: {c.batch_size} above the {n_train} training images; the mae "
                          "protocol drops incomplete batches")
    backbone.eval()  # frozen, BN statistics included
    for p in backbone.parameters():
        p.requires_grad_(False)
    heads = make_heads(c.protocol, feature_dims(backbone, c), num_classes, torch.Generator().manual_seed(seed))
    heads.to(device)
    base = c.lr * lr_scale(c.lr_scaling, c.batch_size, 256)
    opt = make_optimizer(c.protocol, heads.parameters(), base, c.weight_decay)
    spec = ViewSpec(count=1, size=0, crop=True, scale=tuple(c.crop_scale), flip_p=0.5 if c.flip else 0.0)
    make = batch_maker(cfg, data, device)
    steps = max(n_train // c.batch_size if drop_last else math.ceil(n_train / c.batch_size), 1)
    loss = torch.tensor(math.nan)
    for ep in tqdm(range(c.epochs), desc=f"linear ({c.protocol})", unit="ep", leave=False, mininterval=2):
        heads.train()
        for i, batch in enumerate(make([spec], derive_seed(seed, "linprobe", ep), c.batch_size)):
            keep = batch.y >= 0
            if (drop_last and len(batch.y) < c.batch_size) or int(keep.sum()) < 1 + drop_last:
                continue
            with torch.no_grad():
                feats = probe_features(backbone, batch.x[keep], c)
            lr = lr_at(base, c.epochs, c.warmup_epochs, schedule_time(c.protocol, ep, i, steps))
            loss = train_step(heads, opt, feats, batch.y[keep], lr)
    acc = test_accuracy(backbone, heads, data, cfg, device)
    best = int(np.argmax([a for a, _ in acc]))
    out: dict[str, Any] = {"top1": acc[best][0], "final_loss": float(loss.item()),
                           "protocol": protocol_text(backbone, c)}
    if num_classes >= 5:
        out["top5"] = acc[best][1]
    if len(acc) > 1:  # beit: every block
        out["blocks"] = {f"block{k + 1}": a for k, (a, _) in enumerate(acc)}
        out["best_block"] = f"block{best + 1}"
    return out


def protocol_text(backbone: nn.Module, c: Any) -> str:
    from selfsup.models.backbones import vit_trunk

    if vit_trunk(backbone) is None:
        what = "conv net: the backbone output"
    else:
        pool = " + mean patch token" if c.avgpool_patchtokens else ""
        what = {"mae": "CLS token, BN(affine=False) + LARS",
                "dino": f"CLS of the last {c.n_last_blocks} block(s){pool}",
                "beit": "[CLS, mean patch token] per block, the best block"}[c.protocol]
    scale = " x B/256" if c.lr_scaling == "linear" else ""
    return (f"{c.protocol} ({SOURCE[c.protocol]}): {what}; lr {c.lr}{scale}, warm-up {c.warmup_epochs}, "
            f"cosine, {c.epochs} epochs, crops every epoch")

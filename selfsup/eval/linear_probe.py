"""Linear probe on frozen features: one linear layer, fixed schedule, no model selection.

Features are standardised with the *training* split's mean/std (a BN without affine, with the whole
training set's statistics: the affine-free BN that MoCo v3's and MAE's linear probes and the
per-layer probes of DeepCluster, SeLa and RotNet put before the classifier; MoCo v1 / v2's
``main_lincls.py`` and SimCLR's head train on the raw features instead), then trained with SGD +
momentum and a cosine learning rate (or a caller's schedule, ``lr_at``) for a fixed number of
epochs. The test split is touched once, at the end. ``classifier: mlp`` swaps the linear layer for
RotNet's non-linear classifier (``mlp_classifier``).

A feature that is constant on the training split (std <= ``CONSTANT``, e.g. a channel a ReLU keeps
at 0) carries nothing a classifier trained there can use; it is set to 0 on both splits. Dividing
by std + 1e-6 instead blew any test-time variation of it up a million-fold.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from selfsup.eval.knn import topk_accuracy


CONSTANT = 1e-6  # a training-split std at or below this: the feature is constant there


def standardisation(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of each feature on the training split; constant features get std inf (-> 0)."""
    mu, sd = train.mean(0), train.std(0)
    return mu, np.where(sd > CONSTANT, sd, np.inf)


def mlp_classifier(dim: int, num_classes: int, g: torch.Generator) -> nn.Sequential:
    """RotNet's non-linear classifier (gidariss/FeatureLearningRotNet@8539de6
    architectures/NonLinearClassifier.py, cls_type MultLayer): (B, dim) -> Linear(dim, h, no bias) ->
    BN(h) -> ReLU -> Linear(h, h, no bias) -> BN(h) -> ReLU -> Linear(h, classes), h = min(20 x classes,
    2048) (200 for CIFAR-10). Its init: each Linear weight N(0, sqrt(2 / out_features)), biases 0, BN
    weight 1 and bias 0 (the official BatchNorm2d on (B, h) rows normalises each unit over the batch, as
    BatchNorm1d)."""
    h = min(num_classes * 20, 2048)
    net = nn.Sequential(nn.Linear(dim, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(),
                        nn.Linear(h, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, num_classes))
    with torch.no_grad():  # seeded, independent of the global RNG
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.empty(m.weight.shape).normal_(0.0, (2.0 / m.out_features) ** 0.5, generator=g))
                if m.bias is not None:
                    m.bias.zero_()
    return net


def linear_probe(
    train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray, num_classes: int,
    epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int, device: torch.device,
    lr_at: Callable[[int, int], float] | None = None, nesterov: bool = False, classifier: str = "linear",
) -> dict[str, float]:
    """``lr_at(epoch, step)``: the lr of each optimiser step (0-based epoch and step); None: a per-step
    cosine from ``lr`` to 0 (torch's CosineAnnealingLR). ``nesterov``: SGD's Nesterov update."""
    g = torch.Generator().manual_seed(seed)
    mu, sd = standardisation(train)
    xtr = torch.from_numpy((train - mu) / sd).float().to(device)  # (N, D)
    xte = torch.from_numpy((test - mu) / sd).float().to(device)  # (M, D)
    ytr = torch.from_numpy(train_y).long().to(device)
    if classifier == "mlp":
        clf = mlp_classifier(xtr.shape[1], num_classes, g).to(device)
    elif classifier == "linear":
        clf = nn.Linear(xtr.shape[1], num_classes).to(device)
        with torch.no_grad():  # seeded init, independent of the global RNG
            clf.weight.copy_(torch.empty(clf.weight.shape).normal_(0, 0.01, generator=g))
            clf.bias.zero_()
    else:
        raise ValueError(f"linear probe: unknown classifier {classifier!r} (linear | mlp)")
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-len(xtr) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch) if lr_at is None else None
    loss = torch.tensor(0.0)
    step = 0
    clf.train()
    for ep in tqdm(range(epochs), desc="linear", unit="ep", leave=False, mininterval=2):
        perm = torch.randperm(len(xtr), generator=g).to(device)
        for s in range(0, len(xtr), batch_size):
            i = perm[s : s + batch_size]
            if classifier == "mlp" and len(i) < 2:  # batch norm needs two rows
                continue
            if lr_at is not None:
                for group in opt.param_groups:
                    group["lr"] = lr_at(ep, step)
            loss = nn.functional.cross_entropy(clf(xtr[i]), ytr[i])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"linear probe: loss is {loss.item()} (lower linear.lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if sched is not None:
                sched.step()
    clf.eval()
    with torch.no_grad():
        s_tr = clf(xtr).cpu().numpy()
        s_te = clf(xte).cpu().numpy()
    out = {
        "train_top1": 100.0 * topk_accuracy(s_tr, train_y, 1),
        "top1": 100.0 * topk_accuracy(s_te, test_y, 1),
        "final_loss": float(loss.item()),
    }
    if num_classes >= 5:
        out["top5"] = 100.0 * topk_accuracy(s_te, test_y, 5)
    return out

"""Linear probe on frozen features: one linear layer, fixed schedule, no model selection.

Features are standardised with the *training* split's mean/std (a BN without
affine, as MoCo's and SimCLR's linear protocols effectively do), then trained
with SGD + momentum and a cosine learning rate for a fixed number of epochs.
The test split is touched once, at the end.

A feature that is constant on the training split (std <= ``CONSTANT``, e.g. a channel a ReLU keeps
at 0) carries nothing a classifier trained there can use; it is set to 0 on both splits. Dividing
by std + 1e-6 instead blew any test-time variation of it up a million-fold.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from selfsup.knn import topk_accuracy


CONSTANT = 1e-6  # a training-split std at or below this: the feature is constant there


def standardisation(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of each feature on the training split; constant features get std inf (-> 0)."""
    mu, sd = train.mean(0), train.std(0)
    return mu, np.where(sd > CONSTANT, sd, np.inf)


def linear_probe(
    train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray, num_classes: int,
    epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int, device: torch.device,
) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    mu, sd = standardisation(train)
    xtr = torch.from_numpy((train - mu) / sd).float().to(device)  # (N, D)
    xte = torch.from_numpy((test - mu) / sd).float().to(device)  # (M, D)
    ytr = torch.from_numpy(train_y).long().to(device)
    clf = nn.Linear(xtr.shape[1], num_classes).to(device)
    with torch.no_grad():  # seeded init, independent of the global RNG
        clf.weight.copy_(torch.empty(clf.weight.shape).normal_(0, 0.01, generator=g))
        clf.bias.zero_()
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-len(xtr) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    loss = torch.tensor(0.0)
    for _ in tqdm(range(epochs), desc="linear", unit="ep", leave=False, mininterval=2):
        perm = torch.randperm(len(xtr), generator=g).to(device)
        for s in range(0, len(xtr), batch_size):
            i = perm[s : s + batch_size]
            loss = nn.functional.cross_entropy(clf(xtr[i]), ytr[i])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"linear probe: loss is {loss.item()} (lower linear.lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
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

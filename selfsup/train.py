"""The one training loop, shared by every method, with per-epoch resumable checkpoints.

Reproducibility: every random draw of epoch ``e`` (head init, k-means seed,
sample order, augmentations, dropout) is seeded from ``(seed, method, e)`` at the
start of that epoch, and the checkpoint written at the end of each epoch holds the
full model and optimiser state. So a run killed after epoch e and resumed gives,
on a CPU, bit-identical results to an uninterrupted one, with no RNG state to save.

Resume only happens when the checkpoint's key (the full config, the dataset's
metadata and the package source) equals the current one; otherwise training
starts fresh. DVC keeps ``persist`` outputs across ``dvc exp run -S ...``, so this
is what stops a new experiment from silently continuing an old run.
"""
from __future__ import annotations

import hashlib
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from selfsup.config import Config, ConfigError, config_hash
from selfsup.data import Data, ImageDataset
from selfsup.io import InputError, derive_seed, load_torch, resolve_device, save_torch, sha256_file
from selfsup.methods import REGISTRY, Method, TrainContext
from selfsup.models import build_backbone, load_backbone, save_backbone  # noqa: F401 (re-exported)
from selfsup.transforms import method_train_transform

log = logging.getLogger("selfsup.train")
PKG = Path(__file__).resolve().parent


def source_hash() -> str:
    """Hash of the package source that is loaded (hence ran): code changes invalidate checkpoints."""
    files = sorted(
        Path(m.__file__).resolve() for m in list(sys.modules.values())
        if getattr(m, "__file__", None) and Path(m.__file__).resolve().is_relative_to(PKG)
    )
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(PKG)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run_key(cfg: Config, method: str, meta: dict[str, Any]) -> str:
    shared = {"seed": cfg.seed, "device": cfg.device, "workers": cfg.workers, "model": cfg.model,
              "extract": cfg.extract}
    up = cfg.upstream(method)
    # the upstream file's content, not its name: a retrained upstream method must not be resumed over
    up_hash = sha256_file(up) if up is not None and Path(up).is_file() else up
    return config_hash({"shared": config_hash(shared), "method": method, "mcfg": config_hash(cfg.method(method)),
                        "data": config_hash(meta), "code": source_hash(), "upstream": up_hash})


def epoch_lr(c: Any, epoch: int) -> float:
    """Learning rate of (0-based) ``epoch`` under ``c.lr_schedule``; set once per epoch.

    cosine: lr * 0.5 * (1 + cos(pi * e / epochs)) (MoCo's per-epoch ``--cos``);
    step: lr * 0.1 ** (number of ``lr_steps`` <= e) (InstDisc: 120, 160 of 200);
    warm-up: linear from lr / (warmup_epochs + 1) over the first warmup_epochs (SimCLR),
    then the schedule runs over the remaining epochs.
    """
    if epoch < c.warmup_epochs:
        return c.lr * (epoch + 1) / (c.warmup_epochs + 1)
    if c.lr_schedule == "cosine":
        e, n = epoch - c.warmup_epochs, c.epochs - c.warmup_epochs
        return c.lr * 0.5 * (1.0 + math.cos(math.pi * e / n))
    if c.lr_schedule == "step":
        return c.lr * 0.1 ** sum(epoch >= s for s in c.lr_steps)
    return c.lr


def build_method(cfg: Config, name: str, data: Data) -> Method:
    """Backbone (seeded: every method starts from the same weights) + the method around it.

    All checks that need the data or the model run here, before any work.
    """
    if name not in REGISTRY:
        raise ConfigError(f"methods: unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    mcfg = cfg.method(name)
    up = cfg.upstream(name)
    if up is not None and not Path(up).is_file():
        raise InputError(f"{up}: upstream encoder of {name} (methods.{name}) not found")
    torch.manual_seed(derive_seed(cfg.seed, "backbone-init"))
    try:
        backbone = build_backbone(cfg.model.backbone, data.meta["channels"], cfg.model.sobel,
                                  min(data.meta["image_size"]))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    cls.validate(mcfg, data, backbone.out_dim)
    return cls.from_data(backbone, mcfg, data)


def pretrain(
    cfg: Config,
    name: str,
    data: Data,
    ckpt_path: str | Path,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[Method, list[dict[str, float]]]:
    """Train method ``name``; resume from ``ckpt_path`` when its key matches. Returns
    the method (its ``.backbone`` is the result) and the per-epoch history."""
    device = resolve_device(cfg.device)
    method = build_method(cfg, name, data).to(device)
    key = run_key(cfg, name, data.meta)
    ckpt_path = Path(ckpt_path)
    skip = method.needs_labels and not data.has_labels
    if skip:  # e.g. supervised on an unlabelled set: not an error, the row stays empty
        method.skipped = f"{name}: skipped, the training split has no labels (the backbone stays at its init)"
        log.warning(method.skipped)
    if skip or not method.trains:  # e.g. random init: the checkpoint is the initial state
        save_torch(ckpt_path, {"key": key, "epoch": 0, "history": [], "method": method.checkpoint_state(),
                               "config": cfg.to_dict()})
        return method, []
    mcfg = method.cfg
    opt = torch.optim.SGD(method.persistent_params(), lr=mcfg.lr, momentum=mcfg.momentum,
                          weight_decay=mcfg.weight_decay)
    start, history = 0, []
    if ckpt_path.is_file():
        try:
            ck = load_torch(ckpt_path)
        except InputError as e:
            log.warning("%s; starting fresh", e)
            ck = {}
        if ck.get("key") == key:
            method.load_checkpoint_state(ck["method"])
            opt.load_state_dict(ck["optimizer"])
            start, history = ck["epoch"], ck["history"]
            log.warning("%s: resuming from %s after epoch %d/%d", name, ckpt_path, start, mcfg.epochs)
        elif ck:
            log.warning("%s: %s was written by another config or code version; starting fresh", name, ckpt_path)

    dataset = ImageDataset(data.train, method_train_transform(data.meta, mcfg), views=method.views)
    up = cfg.upstream(name)
    ctx = TrainContext(data=data, device=device, seed=cfg.seed, extract_batch_size=cfg.extract.batch_size,
                       train_set=dataset, workers=cfg.workers, upstream=Path(up) if up else None,
                       work_dir=ckpt_path.parent)
    for epoch in range(start, mcfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(derive_seed(cfg.seed, name, "epoch", epoch))
        plan = method.epoch_start(epoch, ctx)
        lr = epoch_lr(mcfg, epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        order = plan.order
        if order is None:
            order = np.random.default_rng(derive_seed(cfg.seed, name, "shuffle", epoch)).permutation(len(dataset))
        loader = DataLoader(dataset, batch_size=mcfg.batch_size, sampler=order.tolist(), num_workers=cfg.workers,
                            generator=torch.Generator().manual_seed(derive_seed(cfg.seed, name, "loader", epoch)),
                            pin_memory=device.type == "cuda", drop_last=len(order) % mcfg.batch_size == 1)
        epoch_opt = method.epoch_optimizer()
        if epoch_opt is not None:
            for g in epoch_opt.param_groups:
                g["lr"] = lr
        method.train()
        sums: dict[str, float] = {}
        steps, seen = 0, 0
        t_train = time.perf_counter()
        bar = tqdm(loader, desc=f"{name} ep {epoch + 1}/{mcfg.epochs}", unit="batch", leave=False, mininterval=2)
        for x, y, idx in bar:
            x = tuple(v.to(device, non_blocking=True) for v in x) if isinstance(x, (list, tuple)) else x.to(device)
            y, idx = y.to(device), idx.to(device)
            loss, logs = method.loss(x, y, idx)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{name}: loss is {loss.item()} at epoch {epoch + 1}, step {steps + 1}; training stopped "
                    f"(lower {name}.lr, check the data)"
                )
            opt.zero_grad(set_to_none=True)
            if epoch_opt is not None:
                epoch_opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if epoch_opt is not None:
                epoch_opt.step()
            for k, v in {"loss": loss.item(), **logs}.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
            seen += len(idx)
        train_s = time.perf_counter() - t_train
        record = {"epoch": epoch + 1, **{k: v / max(steps, 1) for k, v in sums.items()}, **plan.metrics, "lr": lr,
                  "train_images_per_s": seen / max(train_s, 1e-9), "seconds": time.perf_counter() - t0}
        history.append(record)
        save_torch(ckpt_path, {"key": key, "epoch": epoch + 1, "history": history, "method": method.checkpoint_state(),
                               "optimizer": opt.state_dict(), "config": cfg.to_dict()})
        log.info("%s epoch %d: %s", name, epoch + 1, {k: round(v, 4) for k, v in record.items()})
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    return method, history

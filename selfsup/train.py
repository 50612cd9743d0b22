"""The one training loop (the engine), shared by every method; resumable at any step.

Per step: a uint8 batch from the loader (``selfsup.loader``) -> the method's declared views,
augmented batched on the training device (``selfsup.augment``) -> ``model(batch)`` under autocast
(``precision``) -> backward (scaled for fp16) -> every ``accumulate`` batches: clipping (global norm, or per
parameter for DINO), the per-step learning rate and, where the method has one, weight decay
(``selfsup.schedules``), the optimiser step (``selfsup.optim``) ->
``method.on_after_step``. Logs stay on the device and reach the host every ``log_every``
optimiser steps (no host sync per step); the NaN check runs there and at epoch ends, naming the
first bad step.

Reproducibility: every random draw is seeded from ``(seed, method, epoch, batch)`` (the global
torch RNG at each step, the augmentation generator, the sample order, each image's crop), not
carried as RNG state. A checkpoint (every ``checkpoint_minutes`` at a log sync, and at every
epoch end) holds the method's state, the optimiser (and grad scaler), the epoch's plan (its
sample order) and position, and the epoch's partial log sums. So a run killed at any step and
resumed gives, on a CPU, bit-identical weights; the model file is written with a fixed archive
name (``selfsup.io.save_torch``), so it is byte-identical too and DVC sees no change downstream.

Resume only happens when the checkpoint's key (config, dataset metadata, the code the loop runs
for this method: ``selfsup.codedeps``) equals the current one; otherwise training starts fresh.
DVC keeps ``persist`` outputs across ``dvc exp run -S ...``, so this is what stops a new
experiment from silently continuing an old run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from selfsup import dist
from selfsup.augment import ViewSpec, augment, make_views
from selfsup.codedeps import closure, code_hash
from selfsup.config import Config, ConfigError, config_hash
from selfsup.data import Data, FileSplit
from selfsup.io import InputError, derive_seed, load_torch, resolve_device, save_torch, sha256_file
from selfsup.loader import TrainLoader
from selfsup.methods import REGISTRY, Batch, Method, TrainContext
from selfsup.models import build_backbone, load_backbone, save_backbone  # noqa: F401 (re-exported)
from selfsup.optim import build_optimizer, clip_grad_per_param
from selfsup.schedules import lr_schedule, wd_schedule

log = logging.getLogger("selfsup.train")
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_key(cfg: Config, method: str, meta: dict[str, Any]) -> str:
    # what changes the numbers: not workers, log_every or checkpoint_minutes (every draw is seeded
    # by position, not by worker; logging and checkpoints do not touch the state). The number of
    # processes is not in the key but checked beside it: an unfinished run resumes with another
    # number (a lost node; the position is global), a finished one is not reused by another number
    # (a new global batch is a new experiment: `dvc exp run -S dist.nproc_per_node=2` trains anew)
    shared = {"seed": cfg.seed, "device": cfg.device, "model": cfg.model, "extract": cfg.extract,
              "precision": cfg.precision, "channels_last": cfg.channels_last, "compile": cfg.compile,
              "crop": [cfg.dataset.crop_size, cfg.dataset.resize_size]}
    up = cfg.upstream(method)
    # the upstream file's content, not its name: a retrained upstream method must not be resumed over
    up_hash = sha256_file(up) if up is not None and Path(up).is_file() else up
    return config_hash({"shared": config_hash(shared), "method": method, "mcfg": config_hash(cfg.method(method)),
                        "data": config_hash(meta), "code": code_hash(closure("selfsup/train.py", method)),
                        "upstream": up_hash})


def train_image_size(cfg: Config, data: Data) -> int:
    """The side of a default view: native for arrays, ``dataset.crop_size`` for image files."""
    return min(data.fixed_size) if data.fixed_size else cfg.dataset.crop_size


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
    own = getattr(mcfg, "backbone", "")  # the method's own backbone (<m>.backbone), else model.backbone
    try:
        backbone = build_backbone(own or cfg.model.backbone, data.meta["channels"],
                                  bool(getattr(mcfg, "sobel", False)), train_image_size(cfg, data),
                                  adapter=cls.input_adapter(mcfg, data.meta),
                                  key=f"{name}.backbone" if own else "model.backbone")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    cls.validate(mcfg, data, backbone.out_dim)
    return cls.from_data(backbone, mcfg, data)


def ddp_ignore(method: Method) -> list[str]:
    """The names DDP must leave alone: the rank-local parameters (e.g. MLCD's sharded centres). A
    top-level parameter is listed twice: DDP filters its parameter list by ``name`` but its reducer
    by ``module_name + "." + name``, which is ``".name"`` at the top level (torch 2.14: with the
    plain name only, the reducer still averaged the shard's gradient over the ranks)."""
    names = method.rank_local_params()
    return [*names, *(f".{n}" for n in names if "." not in n)]


def resolve_specs(specs: list[ViewSpec], size: int) -> list[ViewSpec]:
    """Views with size 0 take ``size`` (the dataset's view side)."""
    return [s if s.size else dataclasses.replace(s, size=size) for s in specs]


class ViewMaker:
    """Loader batch -> the declared views on the device, augmented batched with per-sample draws
    from a generator seeded per step."""

    def __init__(self, specs: list[ViewSpec], data: Data, device: torch.device, channels_last: bool):
        self.specs, self.device, self.channels_last = specs, device, channels_last
        self.mean, self.std = data.meta["mean"], data.meta["std"]
        self.files = isinstance(data.train, FileSplit)
        # image files: the workers took each view's crop from the original; the device does the rest
        self.flat = [dataclasses.replace(s, count=1, crop=False) for s in specs for _ in range(s.count)]

    def crops(self) -> list[ViewSpec]:
        return [dataclasses.replace(s, count=1) for s in self.specs for _ in range(s.count)]

    def __call__(self, x: Any, y: torch.Tensor, idx: torch.Tensor, seed: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        if self.files:
            views = [augment(v.to(self.device, non_blocking=True), s, g, self.mean, self.std)
                     for v, s in zip(x, self.flat)]
        else:
            views = make_views(x.to(self.device, non_blocking=True), self.specs, g, self.mean, self.std)
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return Batch(views, y.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True))


def batch_maker(cfg: Config, data: Data, device: torch.device) -> Callable[..., Iterator[Batch]]:
    """``make(specs, seed, batch_size)``: the whole training split once in a shuffled order (seeded),
    with the augmentations of ``specs`` (``TrainContext.augmented_batches``: SeLa's re-labelling
    pass, as the official code runs it on the training loader). Several processes: each rank takes
    its contiguous share of the shuffled order, so every sample is seen once."""
    size = train_image_size(cfg, data)
    per_rank = (dist.rank(),) if dist.world() > 1 else ()

    def make(specs: list[ViewSpec], seed: int, batch_size: int) -> Iterator[Batch]:
        vm = ViewMaker(resolve_specs(specs, size), data, device, cfg.channels_last)
        ld = TrainLoader(data.train, batch_size, False, cfg.workers, vm.crops())
        order = np.random.default_rng(seed).permutation(data.n_train)[dist.shard(data.n_train)]
        for b, (x, y, idx) in enumerate(ld.epoch(order, seed)):
            yield vm(x, y, idx, derive_seed(seed, "views", b, *per_rank))

    return make


def pretrain(
    cfg: Config,
    name: str,
    data: Data,
    ckpt_path: str | Path,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    tracker: Any = None,
    tracker_params: dict[str, Any] | None = None,
) -> tuple[Method, list[dict[str, float]]]:
    """Train method ``name``; resume from ``ckpt_path`` when its key matches. Returns the method
    (``.encoder()`` is the result) and the per-epoch history.

    ``on_step(epoch, batch)`` is called after every batch (tests kill runs there);
    ``tracker`` (``selfsup.tracking.LiveRun``) is started once the loop knows whether it resumes
    (``tracker_params``: what it logs as params), then receives the step and epoch logs live."""
    device = resolve_device(cfg.device)  # several processes: this rank's GPU
    rank, world, main = dist.rank(), dist.world(), dist.is_main()
    method = build_method(cfg, name, data).to(device)
    key = run_key(cfg, name, data.meta)
    ckpt_path = Path(ckpt_path)
    method.skipped = type(method).skip_reason(data)
    skip = bool(method.skipped)
    if skip:  # e.g. supervised on an unlabelled set, colourisation on grayscale: not an error, the row says why
        log.warning(method.skipped)
    if skip or not method.trains:  # e.g. random init: the checkpoint is the initial state
        state = method.checkpoint_state()
        if main:
            save_torch(ckpt_path, {"key": key, "epoch": 0, "history": [], "method": state, "world": world,
                                   "config": cfg.to_dict()})
        if tracker is not None and main:
            tracker.start(params=tracker_params, dataset=data.meta)
        return method, []
    mcfg = method.cfg
    if cfg.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if cfg.compile:
        method.backbone.compile()  # in place: state_dict keys unchanged

    model: torch.nn.Module = method  # what the loop calls: the method, or its DDP wrapper
    if world > 1:
        if mcfg.sync_bn:
            method = dist.sync_batch_norm(method, device)
        # buffers (queue, memory bank, pseudo-labels) are kept identical by the methods' own
        # gathered updates, not re-broadcast every step (a bank of 1.28M x 128 is 650 MB)
        method._ddp_params_and_buffers_to_ignore = ddp_ignore(method)
        model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)

    size = train_image_size(cfg, data)
    views = ViewMaker(resolve_specs(method.view_specs(), size), data, device, cfg.channels_last)
    loader = TrainLoader(data.train, mcfg.batch_size, mcfg.drop_last, cfg.workers, views.crops(),
                         pin_memory=device.type == "cuda", rank=rank, world=world)
    n_epoch = method.samples_per_epoch(data.n_train)
    batches_per_epoch = loader.num_batches(n_epoch)
    if batches_per_epoch < 1:
        raise ConfigError(f"{name}.batch_size: {mcfg.batch_size} x {world} processes leaves no batch in an epoch "
                          f"of {n_epoch} images")
    steps_per_epoch = -(-batches_per_epoch // mcfg.accumulate)
    global_batch = mcfg.batch_size * world * mcfg.accumulate
    sched = lr_schedule(mcfg, steps_per_epoch, global_batch)
    opt = build_optimizer(method.param_groups(), mcfg)
    # a weight-decay schedule (DINO's cosine; None for the rest: their groups keep their decay) sets the
    # regularised groups only, those built with a non-zero decay (main_dino.py: param group 0 of
    # get_params_groups; biases and norms stay at 0). Indices: resuming replaces the group dicts
    wd_sched = wd_schedule(mcfg, steps_per_epoch)
    decayed = [i for i, g in enumerate(opt.param_groups) if g["weight_decay"]]
    if wd_sched is not None and not decayed:
        raise ConfigError(f"{name}.weight_decay_end: no parameter group has weight decay to schedule "
                          f"({name}.weight_decay is {mcfg.weight_decay})")
    per_param_clip = bool(getattr(mcfg, "clip_grad_per_param", False))  # DINO's clip_gradients
    amp = AUTOCAST[cfg.precision]
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None

    named = dict(method.named_parameters())
    local_params = [named[n] for n in method.rank_local_params()] if world > 1 else []

    def rank_file(r: int) -> Path:
        return ckpt_path.with_name(f"{ckpt_path.stem}.rank{r}.pt")

    def reset_optimizer_state(params: list[torch.nn.Parameter]) -> None:
        for p in params:
            opt.state.pop(p, None)

    up = cfg.upstream(name)
    ctx = TrainContext(data=data, device=device, seed=cfg.seed, extract_batch_size=cfg.extract.batch_size,
                       total_steps=sched.total_steps,
                       workers=cfg.workers, upstream=Path(up) if up else None, work_dir=ckpt_path.parent,
                       resize_size=cfg.dataset.resize_size, crop_size=cfg.dataset.crop_size,
                       make_batches=batch_maker(cfg, data, device), reset_optimizer_state=reset_optimizer_state)

    start_epoch, start_batch, history, step, sums_from = 0, 0, [], 0, 0
    saved_plan: dict[str, Any] | None = None
    sums: dict[str, torch.Tensor] = {}
    if ckpt_path.is_file():
        try:
            ck = load_torch(ckpt_path)
        except InputError as e:
            log.warning("%s; starting fresh", e)
            ck = {}
        unfinished = ck.get("epoch", 0) < mcfg.epochs or ck.get("batch", 0) > 0
        if ck.get("key") == key and ck.get("world", 1) != world and not unfinished:
            log.warning("%s: %s is a finished run of %d processes; training anew with %d", name, ckpt_path,
                        ck.get("world", 1), world)
        elif ck.get("key") == key:
            method.load_checkpoint_state(ck["method"])
            same = ck.get("world", 1) == world and (not local_params or rank_file(rank).is_file())
            opt.load_state_dict(load_torch(rank_file(rank)) if local_params and same else ck["optimizer"])
            if local_params and not same:  # another sharding: the shards' momentum starts afresh
                for p in local_params:
                    opt.state.pop(p, None)
                log.warning("%s: resumed with another number of processes: the optimiser state of the "
                            "rank-local parameters restarts", name)
            if scaler is not None:
                scaler.load_state_dict(ck["scaler"])
            start_epoch, start_batch, history, step = ck["epoch"], ck["batch"], ck["history"], ck["step"]
            saved_plan, sums = ck.get("plan"), {k: v.to(device) for k, v in ck.get("sums", {}).items()}
            sums_from = ck.get("sums_from", 0)
            if ck.get("world", 1) != world:  # another number of processes: continue at the same sample
                pos = start_batch * ck.get("global_batch", mcfg.batch_size)
                start_batch = pos // (mcfg.batch_size * world)
                step = start_epoch * steps_per_epoch + start_batch // mcfg.accumulate
                sums, sums_from = {}, start_batch  # this epoch's running means restart from here
                log.warning("%s: checkpoint written by %d processes, resuming with %d at sample %d of epoch %d",
                            name, ck.get("world", 1), world, pos, start_epoch + 1)
            method.on_resume(ctx)
            where = f"epoch {start_epoch + 1}, batch {start_batch}" if start_batch else f"epoch {start_epoch}"
            if start_epoch >= mcfg.epochs and not start_batch:  # e.g. the pretrain stage re-run for another method
                log.info("%s: %s holds the finished run (%d epochs): nothing to train", name, ckpt_path, mcfg.epochs)
            else:
                log.warning("%s: resuming from %s after %s/%d", name, ckpt_path, where, mcfg.epochs)
        elif ck:
            log.warning("%s: %s was written by another config or code version; starting fresh", name, ckpt_path)
    if tracker is not None and main:  # a resumed training continues its MLflow run
        tracker.start(params=tracker_params, dataset=data.meta, resume=bool(history) or bool(start_batch))
    else:
        tracker = None

    last_ckpt = time.monotonic()
    # "rank,epoch,batch" (0-based epoch, batches done): tests kill one process of a run there
    kill_at = tuple(int(v) for v in os.environ["SELFSUP_KILL_AT"].split(",")) if "SELFSUP_KILL_AT" in os.environ \
        else None
    for epoch in range(start_epoch, mcfg.epochs):
        t0 = time.perf_counter()
        resumed_mid = bool(start_batch) and saved_plan is not None
        if resumed_mid:  # the plan this epoch started with (its seconds count once)
            assert saved_plan is not None
            order, plan_metrics, plan_seconds = saved_plan["order"], saved_plan["metrics"], saved_plan["seconds"]
        else:
            start_batch, sums = 0, {}
            torch.manual_seed(derive_seed(cfg.seed, name, "epoch", epoch))
            plan = method.on_epoch_start(epoch, ctx)
            order = plan.order
            if order is None:
                order = np.random.default_rng(derive_seed(cfg.seed, name, "shuffle", epoch)).permutation(data.n_train)
            order, plan_metrics = np.asarray(order, np.int64), plan.metrics
            plan_seconds = time.perf_counter() - t0
            if len(order) != n_epoch:
                raise RuntimeError(f"{name}: the epoch plan has {len(order)} samples, "
                                   f"samples_per_epoch() said {n_epoch}")
        plan_state = {"order": order, "metrics": plan_metrics, "seconds": plan_seconds}
        method.train()
        bad_at = torch.full((), -1, dtype=torch.long, device=device)  # first batch with a non-finite loss
        bad_val = torch.zeros((), device=device)
        t_train, seen = time.perf_counter(), 0
        n_batches = batches_per_epoch
        epoch_seed = derive_seed(cfg.seed, name, "crops", epoch)
        bar = tqdm(total=n_batches, initial=start_batch, desc=f"{name} ep {epoch + 1}/{mcfg.epochs}", unit="batch",
                   leave=False, mininterval=2, disable=not main)

        def sync(b: int) -> dict[str, float]:
            """Host sync: NaN check (any rank's NaN stops every rank), then the epoch's running means
            over the batches (and the ranks)."""
            bad = dist.all_reduce((bad_at >= 0).float(), "max")
            if float(bad) > 0:
                where = f"step {int(bad_at) + 1}" if int(bad_at) >= 0 else "another rank"
                raise FloatingPointError(
                    f"{name}: loss is {float(bad_val) if int(bad_at) >= 0 else 'not finite'} at epoch {epoch + 1}, "
                    f"{where}; training stopped (lower {name}.lr, check the data)")
            names = sorted(sums)
            vals = dist.all_reduce(torch.stack([sums[k] for k in names]), "mean") if names else None
            return {k: float(v) / max(b - start_b, 1) for k, v in zip(names, vals if vals is not None else [])}

        def save(done_epochs: int, b: int) -> None:
            """A checkpoint after ``done_epochs`` epochs and ``b`` batches of the next (b = 0: an epoch
            end); every rank builds the method's state (it may gather), rank 0 writes it."""
            state = method.checkpoint_state()
            if local_params:  # each rank's optimiser state of its shard (rank 0's is in the checkpoint)
                save_torch(rank_file(rank), opt.state_dict())
            if not main:
                return
            save_torch(ckpt_path, {
                "key": key, "epoch": done_epochs, "batch": b, "step": step, "history": history,
                "world": world, "global_batch": mcfg.batch_size * world,
                "plan": plan_state if b else None, "sums": {k: v.cpu() for k, v in sums.items()} if b else {},
                "sums_from": start_b if b else 0,
                "method": state, "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "config": cfg.to_dict()})

        lr = sched(step)
        start_b = sums_from if resumed_mid else 0
        sums_from = 0
        per_rank = (rank,) if world > 1 else ()  # draws that must differ by rank (augmentations, dropout)
        for b, (x, y, idx) in enumerate(loader.epoch(order, epoch_seed, start_batch), start=start_batch):
            torch.manual_seed(derive_seed(cfg.seed, name, "step", epoch, b, *per_rank))  # global-RNG users
            batch = views(x, y, idx, derive_seed(cfg.seed, name, "views", epoch, b, *per_rank))
            stepped = (b + 1) % mcfg.accumulate == 0 or b + 1 == n_batches
            # DDP: all-reduce the gradients only on the batch that steps (accumulation)
            no_sync = model.no_sync() if world > 1 and not stepped else contextlib.nullcontext()
            with no_sync:
                with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                    out = model(batch)
                loss = out.loss.float()
                newly = (bad_at < 0) & ~torch.isfinite(loss)
                bad_at = torch.where(newly, torch.full_like(bad_at, b), bad_at)
                bad_val = torch.where(newly, loss.detach(), bad_val)
                scaled = loss / mcfg.accumulate
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            for k, v in {"loss": loss, **out.logs}.items():
                v = v.detach().float().to(device)
                sums[k] = sums[k] + v if k in sums else v.clone()
            if stepped:
                lr = sched(step)
                for g in opt.param_groups:
                    # a fixed-lr group (SimSiam's predictor) keeps the schedule's base lr
                    g["lr"] = (sched.base if g.get("fixed_lr") else lr) * g.get("lr_scale", 1.0)
                if wd_sched is not None:
                    for i in decayed:
                        opt.param_groups[i]["weight_decay"] = wd_sched(step)
                if scaler is not None:
                    scaler.unscale_(opt)
                if mcfg.clip_grad:
                    params = [p for g in opt.param_groups for p in g["params"]]
                    if per_param_clip:
                        clip_grad_per_param(params, mcfg.clip_grad)
                    else:
                        torch.nn.utils.clip_grad_norm_(params, mcfg.clip_grad)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
            method.on_after_step(stepped)
            seen += len(idx)
            bar.update(1)
            if stepped and step % cfg.log_every == 0:
                means = sync(b + 1)
                if tracker is not None:
                    tracker.log({f"step/{k}": v for k, v in {**means, "lr": lr}.items()}, step)
                bar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}", refresh=False)
                if time.monotonic() - last_ckpt >= cfg.checkpoint_minutes * 60 and b + 1 < n_batches:
                    save(epoch, b + 1)
                    last_ckpt = time.monotonic()
            if on_step is not None:
                on_step(epoch, b + 1)
            if kill_at == (rank, epoch, b + 1):  # fault injection (SELFSUP_KILL_AT): this process dies here
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        means = sync(n_batches)
        if world > 1:  # every rank's batch-norm running statistics saw its own batches: average them
            for mod in method.modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                    dist.all_reduce(mod.running_mean, "mean")
                    dist.all_reduce(mod.running_var, "mean")
        train_s = time.perf_counter() - t_train
        record = {"epoch": epoch + 1, **means, **plan_metrics, "lr": lr,
                  # the last step's weight decay (official metric_logger's "wd"); only with a schedule
                  **({"weight_decay": wd_sched(max(step - 1, 0))} if wd_sched is not None else {}),
                  "train_images_per_s": seen / max(train_s, 1e-9),
                  # a resumed epoch: the plan's seconds (measured before the kill) + this process's
                  "seconds": (plan_seconds if resumed_mid else 0.0) + time.perf_counter() - t0}
        history.append(record)
        start_batch, sums = 0, {}
        save(epoch + 1, 0)
        last_ckpt = time.monotonic()
        log.info("%s epoch %d: %s", name, epoch + 1, {k: round(v, 4) for k, v in record.items()})
        if tracker is not None:
            tracker.log({f"epoch/{k}": v for k, v in record.items() if k != "epoch"}, epoch + 1)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    return method, history

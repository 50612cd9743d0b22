"""The one training loop (the engine), shared by every method; resumable at any step.

Per step: a uint8 batch from the loader (``selfsup.data.loader``) -> the method's declared views,
augmented batched on the training device (``selfsup.augment.batched``) -> ``model(batch)`` under autocast
(``precision``) -> backward (scaled for fp16) -> every ``accumulate`` batches: clipping (global norm, or per
parameter for DINO), the per-step learning rate and, where the method has one, weight decay
(``selfsup.engine.schedules``), the optimiser step (``selfsup.engine.optim``) ->
``method.on_after_step``. Logs stay on the device and reach the host every ``log_every``
optimiser steps (no host sync per step); the NaN check runs there and at epoch ends, naming the
first bad step.

Reproducibility: every random draw is seeded from ``(seed, method, epoch, batch)`` (the global
torch RNG at each step, the augmentation generator, the sample order, each image's crop), not
carried as RNG state. A checkpoint (every ``checkpoint_minutes`` at a log sync, and at every
epoch end) holds the method's state, the optimiser (and grad scaler), the epoch's plan (its
sample order) and position, and the epoch's partial log sums. So a run killed at any step and
resumed gives, on a CPU, bit-identical weights; the model file is written with a fixed archive
name (``selfsup.core.io.save_torch``), so it is byte-identical too and DVC sees no change downstream.

Resume only happens when the checkpoint's key (config, dataset metadata, the code the loop runs
for this method: ``selfsup.core.codedeps``) equals the current one; otherwise training starts fresh.
DVC keeps ``persist`` outputs across ``dvc exp run -S ...``, so this is what stops a new
experiment from silently continuing an old run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from selfsup.core import dist
from selfsup.core.codedeps import closure, code_hash
from selfsup.core.config import Config, ConfigError, config_hash, method_class, method_names
from selfsup.data.batches import ViewMaker, batch_maker, resolve_specs, train_image_size
from selfsup.data.prepared import Data
from selfsup.core.io import InputError, derive_seed, load_torch, resolve_device, save_torch, sha256_file
from selfsup.data.loader import TrainLoader
from selfsup.engine.contract import Batch, Method, TrainContext
from selfsup.models.backbones import build_backbone, load_backbone, save_backbone  # noqa: F401 (re-exported)
from selfsup.engine.optim import build_optimizer, clip_grad_per_param
from selfsup.engine.schedules import lr_schedule, wd_schedule

log = logging.getLogger("selfsup.engine.loop")
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
                        "data": config_hash(meta), "code": code_hash(closure("selfsup/engine/loop.py", method)),
                        "upstream": up_hash})


def build_method(cfg: Config, name: str, data: Data) -> Method:
    """Backbone (seeded: every method starts from the same weights) + the method around it.

    All checks that need the data or the model run here, before any work.
    """
    known = method_names()
    if name not in known:
        raise ConfigError(f"methods: unknown method {name!r}; known: {', '.join(known)}")
    cls = method_class(name)
    mcfg = cfg.method(name)
    up = cfg.upstream(name)
    if up is not None and not Path(up).is_file():
        raise InputError(f"{up}: upstream encoder of {name} (methods.{name}) not found")
    torch.manual_seed(derive_seed(cfg.seed, "backbone-init"))
    own = getattr(mcfg, "backbone", "")  # the method's own backbone (<m>.backbone), else model.backbone
    side = train_image_size(cfg, data)
    try:
        backbone = build_backbone(own or cfg.model.backbone, data.meta["channels"],
                                  bool(getattr(mcfg, "sobel", False)), side,
                                  adapter=cls.input_adapter(mcfg, data.meta),
                                  key=f"{name}.backbone" if own else "model.backbone",
                                  **cls.backbone_options(mcfg, data.meta, side))
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


@dataclasses.dataclass
class Checkpoint:
    """The training state on disk: every field always present (``read`` rejects a record of another
    layout as "another version", and training starts fresh)."""

    key: str  # run_key: config, dataset metadata, the loop's code for this method
    epoch: int  # epochs done
    batch: int  # batches done of the next epoch (0: written at an epoch end)
    step: int  # optimiser steps done
    history: list[dict[str, float]]  # one record per finished epoch
    world: int  # processes that wrote it
    global_batch: int  # batch_size x world: a resume with another world continues at the same sample
    plan: dict[str, Any] | None  # mid-epoch: the epoch's {order, metrics, seconds}
    sums: dict[str, torch.Tensor]  # mid-epoch: the epoch's log sums so far (on the CPU)
    sums_from: int  # the batch those sums start at (a resume with another world restarts them)
    method: dict[str, Any]  # Method.checkpoint_state()
    optimizer: dict[str, Any] | None  # None: a method that does not train
    scaler: dict[str, Any] | None  # fp16's grad scaler
    config: dict[str, Any]  # the whole config, for people reading the file

    def save(self, path: Path) -> None:
        save_torch(path, dataclasses.asdict(self))

    @classmethod
    def read(cls, path: Path) -> "Checkpoint | None":
        """The record at ``path``; None (with a warning) for a corrupt file or another layout."""
        try:
            raw = load_torch(path)
        except InputError as e:
            log.warning("%s; starting fresh", e)
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or set(raw) != names:
            log.warning("%s: a checkpoint of another layout (another version of the code); starting fresh", path)
            return None
        return cls(**raw)


@dataclasses.dataclass
class Position:
    """Where the loop starts: the first epoch and batch, the steps and history so far, and (resumed
    mid-epoch) the epoch's saved plan and partial log sums."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    plan: dict[str, Any] | None = None
    sums: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    sums_from: int = 0


class Trainer:
    """The loop of one method in parts: ``resume`` (the checkpoint's position), ``run_epoch`` (plan,
    batches, the epoch record), ``optimizer_step`` and ``save``. Built by ``pretrain``."""

    def __init__(self, cfg: Config, name: str, data: Data, ckpt_path: Path, method: Method, key: str,
                 device: torch.device):
        self.cfg, self.name, self.data, self.ckpt_path, self.key, self.device = cfg, name, data, ckpt_path, key, device
        self.rank, self.world, self.main = dist.rank(), dist.world(), dist.is_main()
        mcfg = self.mcfg = method.cfg
        if cfg.channels_last:
            method = method.to(memory_format=torch.channels_last)
        if cfg.compile:
            method.backbone.compile()  # in place: state_dict keys unchanged
        self.model: torch.nn.Module = method  # what the loop calls: the method, or its DDP wrapper
        if self.world > 1:
            if mcfg.sync_bn:
                method = dist.sync_batch_norm(method, device)
            # buffers (queue, memory bank, pseudo-labels) are kept identical by the methods' own
            # gathered updates, not re-broadcast every step (a bank of 1.28M x 128 is 650 MB)
            method._ddp_params_and_buffers_to_ignore = ddp_ignore(method)
            self.model = torch.nn.parallel.DistributedDataParallel(
                method, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
        self.method = method
        size = train_image_size(cfg, data)
        self.views = ViewMaker(resolve_specs(method.view_specs(), size), data, device, cfg.channels_last)
        self.loader = TrainLoader(data.train, mcfg.batch_size, mcfg.drop_last, cfg.workers, self.views.crops(),
                                  pin_memory=device.type == "cuda", rank=self.rank, world=self.world)
        self.n_epoch = method.samples_per_epoch(data.n_train)
        self.batches_per_epoch = self.loader.num_batches(self.n_epoch)
        if self.batches_per_epoch < 1:
            raise ConfigError(f"{name}.batch_size: {mcfg.batch_size} x {self.world} processes leaves no batch in "
                              f"an epoch of {self.n_epoch} images")
        self.steps_per_epoch = -(-self.batches_per_epoch // mcfg.accumulate)
        self._optimisation()
        named = dict(method.named_parameters())
        self.local_params = [named[n] for n in method.rank_local_params()] if self.world > 1 else []
        up = cfg.upstream(name)
        self.ctx = TrainContext(
            data=data, device=device, seed=cfg.seed, extract_batch_size=cfg.extract.batch_size,
            total_steps=self.sched.total_steps, workers=cfg.workers, upstream=Path(up) if up else None,
            work_dir=ckpt_path.parent, resize_size=cfg.dataset.resize_size, crop_size=cfg.dataset.crop_size,
            make_batches=batch_maker(cfg, data, device), reset_optimizer_state=self.reset_optimizer_state)

    def _optimisation(self) -> None:
        """The lr (and DINO's weight-decay) schedules, the optimiser, clipping and the fp16 scaler."""
        mcfg, name = self.mcfg, self.name
        self.sched = lr_schedule(mcfg, self.steps_per_epoch, mcfg.batch_size * self.world * mcfg.accumulate)
        self.opt = build_optimizer(self.method.param_groups(), mcfg)
        # a weight-decay schedule (DINO's cosine; None for the rest: their groups keep their decay) sets the
        # regularised groups only, those built with a non-zero decay (main_dino.py: param group 0 of
        # get_params_groups; biases and norms stay at 0). Indices: resuming replaces the group dicts
        self.wd_sched = wd_schedule(mcfg, self.steps_per_epoch)
        self.decayed = [i for i, g in enumerate(self.opt.param_groups) if g["weight_decay"]]
        if self.wd_sched is not None and not self.decayed:
            raise ConfigError(f"{name}.weight_decay_end: no parameter group has weight decay to schedule "
                              f"({name}.weight_decay is {mcfg.weight_decay})")
        self.per_param_clip = bool(getattr(mcfg, "clip_grad_per_param", False))  # DINO's clip_gradients
        self.amp = AUTOCAST[self.cfg.precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if self.cfg.precision == "fp16" else None

    def reset_optimizer_state(self, params: list[torch.nn.Parameter]) -> None:
        for p in params:
            self.opt.state.pop(p, None)

    def rank_file(self, r: int) -> Path:
        return self.ckpt_path.with_name(f"{self.ckpt_path.stem}.rank{r}.pt")

    # ------------------------------------------------------------------ resume
    def resume(self) -> Position:
        """The position to start from: the checkpoint's when its key matches (its state loaded into
        the method, optimiser and scaler), else the beginning."""
        ck = Checkpoint.read(self.ckpt_path) if self.ckpt_path.is_file() else None
        name, mcfg, world = self.name, self.mcfg, self.world
        if ck is None:
            return Position()
        if ck.key != self.key:
            log.warning("%s: %s was written by another config or code version; starting fresh", name, self.ckpt_path)
            return Position()
        unfinished = ck.epoch < mcfg.epochs or ck.batch > 0
        if ck.world != world and not unfinished:
            log.warning("%s: %s is a finished run of %d processes; training anew with %d", name, self.ckpt_path,
                        ck.world, world)
            return Position()
        self._load_state(ck)
        pos = Position(ck.epoch, ck.batch, ck.step, ck.history, ck.plan,
                       {k: v.to(self.device) for k, v in ck.sums.items()}, ck.sums_from)
        if ck.world != world:  # another number of processes: continue at the same sample
            sample = ck.batch * ck.global_batch
            pos.batch = sample // (mcfg.batch_size * world)
            pos.step = ck.epoch * self.steps_per_epoch + pos.batch // mcfg.accumulate
            pos.sums, pos.sums_from = {}, pos.batch  # this epoch's running means restart from here
            log.warning("%s: checkpoint written by %d processes, resuming with %d at sample %d of epoch %d",
                        name, ck.world, world, sample, ck.epoch + 1)
        self.method.on_resume(self.ctx)
        where = f"epoch {pos.epoch + 1}, batch {pos.batch}" if pos.batch else f"epoch {pos.epoch}"
        if pos.epoch >= mcfg.epochs and not pos.batch:  # e.g. the pretrain stage re-run for another method
            log.info("%s: %s holds the finished run (%d epochs): nothing to train", name, self.ckpt_path, mcfg.epochs)
        else:
            log.warning("%s: resuming from %s after %s/%d", name, self.ckpt_path, where, mcfg.epochs)
        return pos

    def _load_state(self, ck: Checkpoint) -> None:
        self.method.load_checkpoint_state(ck.method)
        same = ck.world == self.world and (not self.local_params or self.rank_file(self.rank).is_file())
        if ck.optimizer is None:
            raise InputError(f"{self.ckpt_path}: a checkpoint without optimiser state under a training run's key")
        self.opt.load_state_dict(load_torch(self.rank_file(self.rank)) if self.local_params and same
                                 else ck.optimizer)
        if self.local_params and not same:  # another sharding: the shards' momentum starts afresh
            self.reset_optimizer_state(self.local_params)
            log.warning("%s: resumed with another number of processes: the optimiser state of the "
                        "rank-local parameters restarts", self.name)
        if self.scaler is not None:
            if ck.scaler is None:
                raise InputError(f"{self.ckpt_path}: an fp16 run's checkpoint without its grad scaler state")
            self.scaler.load_state_dict(ck.scaler)

    # ------------------------------------------------------------------ save
    def save(self, pos: Position, done_epochs: int, b: int, plan_state: dict[str, Any] | None,
             sums: dict[str, torch.Tensor], sums_from: int) -> None:
        """A checkpoint after ``done_epochs`` epochs and ``b`` batches of the next (b = 0: an epoch
        end); every rank builds the method's state (it may gather), rank 0 writes it."""
        state = self.method.checkpoint_state()
        if self.local_params:  # each rank's optimiser state of its shard (rank 0's is in the checkpoint)
            save_torch(self.rank_file(self.rank), self.opt.state_dict())
        if not self.main:
            return
        Checkpoint(key=self.key, epoch=done_epochs, batch=b, step=pos.step, history=pos.history, world=self.world,
                   global_batch=self.mcfg.batch_size * self.world, plan=plan_state if b else None,
                   sums={k: v.cpu() for k, v in sums.items()} if b else {}, sums_from=sums_from if b else 0,
                   method=state, optimizer=self.opt.state_dict(),
                   scaler=self.scaler.state_dict() if self.scaler else None,
                   config=self.cfg.to_dict()).save(self.ckpt_path)

    # ------------------------------------------------------------------ one optimiser step
    def optimizer_step(self, step: int) -> float:
        """The step's lr (and weight decay) into the groups, unscale / clip, step, zero the gradients;
        returns the lr."""
        lr = self.sched(step)
        for g in self.opt.param_groups:
            # a fixed-lr group (SimSiam's predictor) keeps the schedule's base lr
            g["lr"] = (self.sched.base if g.get("fixed_lr") else lr) * g.get("lr_scale", 1.0)
        if self.wd_sched is not None:
            for i in self.decayed:
                self.opt.param_groups[i]["weight_decay"] = self.wd_sched(step)
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        if self.mcfg.clip_grad:
            params = [p for g in self.opt.param_groups for p in g["params"]]
            if self.per_param_clip:
                clip_grad_per_param(params, self.mcfg.clip_grad)
            else:
                torch.nn.utils.clip_grad_norm_(params, self.mcfg.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return lr

    # ------------------------------------------------------------------ one epoch
    def plan_epoch(self, epoch: int, pos: Position) -> tuple[dict[str, Any], bool]:
        """The epoch's {order, metrics, seconds}: the saved plan when resumed mid-epoch (its seconds
        count once), else the method's ``on_epoch_start`` (seeded) and a seeded shuffle."""
        t0 = time.perf_counter()
        if pos.batch and pos.plan is not None:
            return pos.plan, True
        pos.batch, pos.sums = 0, {}
        torch.manual_seed(derive_seed(self.cfg.seed, self.name, "epoch", epoch))
        plan = self.method.on_epoch_start(epoch, self.ctx)
        order = plan.order
        if order is None:
            order = np.random.default_rng(derive_seed(self.cfg.seed, self.name, "shuffle", epoch)).permutation(
                self.data.n_train)
        order = np.asarray(order, np.int64)
        if len(order) != self.n_epoch:
            raise RuntimeError(f"{self.name}: the epoch plan has {len(order)} samples, "
                               f"samples_per_epoch() said {self.n_epoch}")
        return {"order": order, "metrics": plan.metrics, "seconds": time.perf_counter() - t0}, False

    def _nan_check_and_means(self, epoch: int, nan: "_NanWatch", sums: dict[str, torch.Tensor],
                             b: int, start_b: int) -> dict[str, float]:
        """Host sync: NaN check (any rank's NaN stops every rank), then the epoch's running means
        over the batches (and the ranks)."""
        bad = dist.all_reduce((nan.at >= 0).float(), "max")
        if float(bad) > 0:
            where = f"step {int(nan.at) + 1}" if int(nan.at) >= 0 else "another rank"
            raise FloatingPointError(
                f"{self.name}: loss is {float(nan.val) if int(nan.at) >= 0 else 'not finite'} at epoch {epoch + 1}, "
                f"{where}; training stopped (lower {self.name}.lr, check the data)")
        names = sorted(sums)
        vals = dist.all_reduce(torch.stack([sums[k] for k in names]), "mean") if names else None
        return {k: float(v) / max(b - start_b, 1) for k, v in zip(names, vals if vals is not None else [])}

    def run_epoch(self, epoch: int, pos: Position, tracker: Any,
                  on_step: Callable[[int, int], None] | None) -> dict[str, float]:
        """Train epoch ``epoch`` from ``pos.batch``; checkpoints on the way and at its end (``pos``
        advanced to the next epoch); returns its record."""
        cfg, mcfg, name, device, rank = self.cfg, self.mcfg, self.name, self.device, self.rank
        t0 = time.perf_counter()
        plan_state, resumed_mid = self.plan_epoch(epoch, pos)
        self.method.train()
        nan = _NanWatch(device)
        t_train, seen, n_batches = time.perf_counter(), 0, self.batches_per_epoch
        bar = tqdm(total=n_batches, initial=pos.batch, desc=f"{name} ep {epoch + 1}/{mcfg.epochs}", unit="batch",
                   leave=False, mininterval=2, disable=not self.main)
        lr = self.sched(pos.step)
        start_b = pos.sums_from if resumed_mid else 0
        pos.sums_from = 0
        sums = pos.sums
        per_rank = (rank,) if self.world > 1 else ()  # draws that must differ by rank (augmentations, dropout)
        epoch_seed = derive_seed(cfg.seed, name, "crops", epoch)
        for b, (x, y, idx) in enumerate(self.loader.epoch(plan_state["order"], epoch_seed, pos.batch),
                                        start=pos.batch):
            torch.manual_seed(derive_seed(cfg.seed, name, "step", epoch, b, *per_rank))  # global-RNG users
            batch = self.views(x, y, idx, derive_seed(cfg.seed, name, "views", epoch, b, *per_rank))
            stepped = (b + 1) % mcfg.accumulate == 0 or b + 1 == n_batches
            self._forward_backward(batch, b, stepped, nan, sums)
            if stepped:
                lr = self.optimizer_step(pos.step)
                pos.step += 1
            self.method.on_after_step(stepped)
            seen += len(idx)
            bar.update(1)
            if stepped and pos.step % cfg.log_every == 0:
                means = self._nan_check_and_means(epoch, nan, sums, b + 1, start_b)
                if tracker is not None:
                    tracker.log({f"step/{k}": v for k, v in {**means, "lr": lr}.items()}, pos.step)
                bar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}", refresh=False)
                if time.monotonic() - self.last_ckpt >= cfg.checkpoint_minutes * 60 and b + 1 < n_batches:
                    self.save(pos, epoch, b + 1, plan_state, sums, start_b)
                    self.last_ckpt = time.monotonic()
            if on_step is not None:
                on_step(epoch, b + 1)
        bar.close()
        means = self._nan_check_and_means(epoch, nan, sums, n_batches, start_b)
        self._average_bn_statistics()
        train_s = time.perf_counter() - t_train
        record = {"epoch": epoch + 1, **means, **plan_state["metrics"], "lr": lr,
                  # the last step's weight decay (official metric_logger's "wd"); only with a schedule
                  **({"weight_decay": self.wd_sched(max(pos.step - 1, 0))} if self.wd_sched is not None else {}),
                  "train_images_per_s": seen / max(train_s, 1e-9),
                  # a resumed epoch: the plan's seconds (from before the kill) + this process's
                  "seconds": (plan_state["seconds"] if resumed_mid else 0.0) + time.perf_counter() - t0}
        pos.history.append(record)
        pos.batch, pos.sums = 0, {}
        self.save(pos, epoch + 1, 0, None, {}, 0)
        self.last_ckpt = time.monotonic()
        return record

    def _forward_backward(self, batch: Batch, b: int, stepped: bool, nan: "_NanWatch",
                          sums: dict[str, torch.Tensor]) -> None:
        """The method's loss on one batch under autocast, its backward (scaled for fp16 and
        accumulation; DDP all-reduces only on the batch that steps) and the log sums."""
        no_sync = self.model.no_sync() if self.world > 1 and not stepped else contextlib.nullcontext()
        with no_sync:
            amp = torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else contextlib.nullcontext()
            with amp:
                out = self.model(batch)
            loss = out.loss.float()
            nan.note(loss, b)
            scaled = loss / self.mcfg.accumulate
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        for k, v in {"loss": loss, **out.logs}.items():
            v = v.detach().float().to(self.device)
            sums[k] = sums[k] + v if k in sums else v.clone()

    def _average_bn_statistics(self) -> None:
        """Several processes: every rank's batch-norm running statistics saw its own batches: average them."""
        if self.world == 1:
            return
        for mod in self.method.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                dist.all_reduce(mod.running_mean, "mean")
                dist.all_reduce(mod.running_var, "mean")


class _NanWatch:
    """The first batch of an epoch with a non-finite loss, kept on the device (no host sync per step)."""

    def __init__(self, device: torch.device):
        self.at = torch.full((), -1, dtype=torch.long, device=device)
        self.val = torch.zeros((), device=device)

    def note(self, loss: torch.Tensor, b: int) -> None:
        newly = (self.at < 0) & ~torch.isfinite(loss)
        self.at = torch.where(newly, torch.full_like(self.at, b), self.at)
        self.val = torch.where(newly, loss.detach(), self.val)


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
    ``tracker`` (``selfsup.core.tracking.LiveRun``) is started once the loop knows whether it resumes
    (``tracker_params``: what it logs as params), then receives the step and epoch logs live."""
    device = resolve_device(cfg.device)  # several processes: this rank's GPU
    main = dist.is_main()
    method = build_method(cfg, name, data).to(device)
    key = run_key(cfg, name, data.meta)
    ckpt_path = Path(ckpt_path)
    method.skipped = type(method).skip_reason(data)
    if method.skipped:  # e.g. supervised on an unlabelled set, colourisation on grayscale: not an error, the row says why
        log.warning(method.skipped)
    if method.skipped or not method.trains:  # e.g. random init: the checkpoint is the initial state
        if main:
            Checkpoint(key=key, epoch=0, batch=0, step=0, history=[], world=dist.world(), global_batch=0, plan=None,
                       sums={}, sums_from=0, method=method.checkpoint_state(), optimizer=None, scaler=None,
                       config=cfg.to_dict()).save(ckpt_path)
        if tracker is not None and main:
            tracker.start(params=tracker_params, dataset=data.meta)
        return method, []
    trainer = Trainer(cfg, name, data, ckpt_path, method, key, device)
    pos = trainer.resume()
    if tracker is not None and main:  # a resumed training continues its MLflow run
        tracker.start(params=tracker_params, dataset=data.meta, resume=bool(pos.history) or bool(pos.batch))
    else:
        tracker = None
    trainer.last_ckpt = time.monotonic()
    for epoch in range(pos.epoch, trainer.mcfg.epochs):
        record = trainer.run_epoch(epoch, pos, tracker, on_step)
        log.info("%s epoch %d: %s", name, epoch + 1, {k: round(v, 4) for k, v in record.items()})
        if tracker is not None:
            tracker.log({f"epoch/{k}": v for k, v in record.items() if k != "epoch"}, epoch + 1)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    return trainer.method, pos.history

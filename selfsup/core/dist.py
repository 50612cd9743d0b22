"""torch.distributed helpers. Every function is a no-op (or the identity) at world size 1, so the
library is written once for one process and for many.

- ``init_from_env``: joins the process group that ``torchrun`` describes in the environment
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``): NCCL on GPUs,
  gloo on CPUs, with a timeout on every collective, so a rank that dies makes the others fail
  with an error instead of waiting for ever. Under torchrun it also starts the agent watchdog
  (the rank ends as soon as its torchrun agent is gone: nothing reaps or stops a rank whose agent
  was killed, and it would go on writing checkpoints after its stage failed) and, under
  ``selfsup.core.launch``, keeps the rank's record (pid, then how it ended) in ``$SELFSUP_RANK_DIR``, from
  which the launcher names the rank that was lost.
- ``all_gather`` (no gradient) and ``all_gather_grad`` (the gradient flows back to every rank's
  own slice: the backward pass all-reduces the incoming gradient and keeps this rank's part, as
  lightly's ``GatherLayer`` and SimCLR's TPU ``cross_replica`` gather); both concatenate along
  dim 0 in rank order; ``all_gather_varlen`` for shards of unequal length.
- ``all_reduce``, ``broadcast``, ``broadcast_object``, ``barrier``; ``shard`` splits N items into
  contiguous per-rank ranges.

Why the gathered loss equals the one-process loss: with L_r the mean loss over rank r's anchors
(equal counts), DDP averages the parameter gradients, (1 / W) sum_r dL_r/dtheta, and the gathered
embeddings carry every rank's loss back to the rank that computed them (the all-reduce in
``all_gather_grad``'s backward), so the result is d(mean_r L_r)/dtheta, the gradient of the loss
over the global batch.
"""
from __future__ import annotations

import atexit
import datetime
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(backend: str = "auto", timeout_s: float = 300.0) -> bool:
    """Join torchrun's process group (once); False when not launched by torchrun or world size 1."""
    if is_dist():
        return True
    if not under_torchrun():
        return False
    watch_agent()
    if int(os.environ["WORLD_SIZE"]) == 1:
        return False
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
        # a rank that stops answering fails the collectives of the others after the timeout
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


# ----------------------------------------------------------------- a rank ends with its agent
RANK_DIR_ENV = "SELFSUP_RANK_DIR"  # set by selfsup.core.launch: the folder of the ranks' records
WATCH_POLL_S = 0.5  # how often a rank checks that its agent is alive
_WATCHING = False
_RECORD: dict[str, Any] = {}
_RECORD_LOCK = threading.Lock()
_PREVIOUS_HOOK = sys.excepthook  # the hook that prints a rank's uncaught exception, before its record


def proc_stat(pid: int) -> tuple[str, str, int] | None:
    """(state letter, start time in clock ticks since boot, wait status of a zombie: 0 until it has
    ended) from Linux's /proc/<pid>/stat; None when there is no such process. Only where
    ``HAVE_PROC``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": the name may hold spaces
    return fields[0], fields[19], int(fields[-1])


HAVE_PROC = proc_stat(os.getpid()) is not None


def _write_record(**fields: Any) -> None:
    """This rank's record in the launcher's folder (replaced whole: the launcher never reads half)."""
    folder = os.environ.get(RANK_DIR_ENV)
    if not folder:
        return
    with _RECORD_LOCK:
        _RECORD.update(fields, time=time.time())
        path = Path(folder) / f"rank{_RECORD['rank']}.json"
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_RECORD))
        os.replace(tmp, path)


def _record_exception(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    _PREVIOUS_HOOK(kind, value, tb)
    _write_record(state="error", error=f"{kind.__name__}: {value}"[:500])


def _record_exit() -> None:
    if _RECORD.get("state") == "running":  # returned or sys.exit; an exception was recorded already
        _write_record(state="exited")


def _end_orphan(agent: int) -> None:
    """The agent is gone: stop this rank, and its DataLoader workers, at once."""
    why = ""
    try:
        _write_record(state="orphaned")
    except OSError as e:  # the launcher is gone too (its folder with it): ending this rank matters more
        why = f" (its record could not be written: {e})"
    print(f"selfsup: rank {os.environ.get('RANK')} (pid {os.getpid()}): its torchrun agent (pid {agent}) is gone; "
          f"ending this rank{why}", file=sys.stderr, flush=True)
    # torchrun starts every rank in a session of its own: its group is the rank and its workers
    if hasattr(os, "killpg") and os.getpgid(0) == os.getpid():
        os.killpg(0, signal.SIGKILL)
    os._exit(1)


def watch_agent(poll_s: float = WATCH_POLL_S) -> None:
    """Under torchrun (once per process): a daemon thread ends this process as soon as its parent,
    torchrun's agent, is gone (the rank was re-parented), e.g. when the agent was killed: torchrun
    stops its ranks only while it runs. The parent-death signal (prctl PR_SET_PDEATHSIG) would be
    instant, but it fires when the parent *thread* that started the rank ends, which a rank cannot
    check; the launcher stops whatever outlives this by more than a few seconds (a thread that
    cannot get the GIL). Under ``selfsup.core.launch``, also starts the rank's record."""
    global _WATCHING, _PREVIOUS_HOOK
    if _WATCHING:
        return
    _WATCHING = True
    agent = os.getppid()
    if os.environ.get(RANK_DIR_ENV):
        stat = proc_stat(os.getpid()) if HAVE_PROC else None
        _write_record(rank=int(os.environ["RANK"]), local_rank=local_rank(), pid=os.getpid(), agent=agent,
                      start=stat[1] if stat else None, state="running")
        _PREVIOUS_HOOK = sys.excepthook
        sys.excepthook = _record_exception
        atexit.register(_record_exit)
        if agent == 1:  # the launcher starts torchrun, so it is never pid 1: the agent has died already
            _end_orphan(agent)

    def watch() -> None:
        while os.getppid() == agent:
            time.sleep(poll_s)
        _end_orphan(agent)

    threading.Thread(target=watch, name="selfsup-agent-watchdog", daemon=True).start()


def shard(n: int, r: int | None = None, w: int | None = None) -> slice:
    """Rank ``r``'s contiguous share of ``n`` items (the first ``n % w`` ranks get one more)."""
    r = rank() if r is None else r
    w = world() if w is None else w
    q, rem = divmod(n, w)
    start = r * q + min(r, rem)
    return slice(start, start + q + (1 if r < rem else 0))


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on every rank (same shape) -> (W * B, ...), rank order; no gradient."""
    if world() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@torch.no_grad()
def all_gather_varlen(x: torch.Tensor) -> torch.Tensor:
    """Like ``all_gather`` for shards whose first dimension differs by rank (sharded extraction)."""
    if world() == 1:
        return x
    n = torch.tensor([len(x)], device=x.device)
    sizes = all_gather(n).tolist()
    big = max(sizes)
    pad = torch.zeros((big - len(x), *x.shape[1:]), dtype=x.dtype, device=x.device)
    full = all_gather(torch.cat([x, pad]))
    return torch.cat([full[i * big: i * big + s] for i, s in enumerate(sizes)])


_GROUP: Any = None


def _grad_group() -> Any:
    """A second process group for the collectives inside autograd (the gradient-carrying gather and
    all-reduce), so that they are ordered apart from DDP's asynchronous all-reduces of gradient
    buckets on the default group during the same backward pass. Created on first use (a collective
    call: every rank reaches it at the same point of the same forward)."""
    global _GROUP
    if _GROUP is None:
        _GROUP = dist.new_group()
    return _GROUP


class _GatherGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.b = x.shape[0]
        out = [torch.empty_like(x) for _ in range(world())]
        dist.all_gather(out, x.contiguous(), group=_grad_group())
        return torch.cat(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, group=_grad_group())  # every rank's loss, back to the rank that computed each row
        r = rank()
        return grad[r * ctx.b:(r + 1) * ctx.b]


def all_gather_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (W * B, ...) in rank order, differentiable (see the module docstring)."""
    if world() == 1:
        return x
    return _GatherGrad.apply(x)


def all_reduce_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, differentiable: every rank's input gets the sum of the ranks' output gradients."""
    if world() == 1:
        return x
    return _AllReduceGrad.apply(x)


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place; ``op``: sum | mean | max | min."""
    if world() == 1:
        return x
    if op == "mean":
        dist.all_reduce(x)
        return x.div_(world())
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    dist.all_reduce(x, op=ops[op])
    return x


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: every rank gets ``src``'s ``x`` (same shape and dtype everywhere)."""
    if world() > 1:
        dist.broadcast(x, src)
    return x


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Any picklable object from ``src`` (e.g. a clustering's numpy results)."""
    if world() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src)
    return box[0]


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def destroy() -> None:
    global _GROUP
    if is_dist():
        dist.destroy_process_group()
    _GROUP = None


class _AllReduceGrad(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of the ranks' output gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x, group=_grad_group())
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=_grad_group())
        return grad


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of all ranks, for any backend: torch's ``SyncBatchNorm``
    only runs on GPUs, this one also under gloo on CPUs (tests, CPU clusters). Training mode: the
    per-channel sums, sums of squares and counts are all-reduced through a differentiable
    all-reduce (its backward all-reduces the gradients), so forward and backward are those of one
    BN over the concatenated batch; running
    statistics as ``nn.BatchNorm`` (unbiased variance, ``momentum``). Eval mode: plain BN."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world() == 1:
            return super().forward(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        n_local = x.numel() // c
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_full((1,), float(n_local))])  # (2C + 1,)
        stats = _AllReduceGrad.apply(stats)
        n = stats[-1]
        mean, sq = stats[:c] / n, stats[c:2 * c] / n
        var = sq - mean * mean  # biased, as BN normalises with
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batch_norm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Every BatchNorm of ``module`` over the global batch: torch's ``SyncBatchNorm`` on GPUs (fused
    kernels), ``GlobalBatchNorm`` elsewhere. Same parameters and buffers (state_dict keys)."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        new.load_state_dict(module.state_dict())
        if module.affine:  # a frozen BN (an EMA target's, a teacher's) stays frozen, as torch's converter keeps it
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        new.train(module.training)
        return new.to(next(module.buffers(), torch.zeros(())).device)
    for name, child in module.named_children():
        module.add_module(name, sync_batch_norm(child, device))
    return module

"""Run a function on W local processes joined by torch.distributed (gloo, CPU), as torchrun would.

    results = run_ranks(fn, world=2, args=(...))   # [fn's return value on rank 0, rank 1, ...]

``fn`` must be a module-level function (the processes are spawned, not forked: forking a
process that already runs OpenMP / gloo threads can deadlock). Each process gets torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), joins the group through
``selfsup.core.dist.init_from_env`` and returns its result through a file. A process that fails or
hangs fails the caller, with its traceback.
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(r: int, fn: Callable[..., Any], world: int, port: int, args: tuple, out: str, threads: int) -> None:
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from selfsup.core import dist

    try:
        dist.init_from_env(backend="gloo", timeout_s=120)
        res = fn(*args)
        torch.save({"ok": True, "result": res}, Path(out) / f"{r}.pt")
    except BaseException as e:  # noqa: BLE001 - reported to the parent with the traceback, then re-raised
        torch.save({"ok": False, "error": f"rank {r}: {type(e).__name__}: {e}\n{traceback.format_exc()}"},
                   Path(out) / f"{r}.pt")
        raise
    finally:
        dist.destroy()


def run_ranks(fn: Callable[..., Any], world: int = 2, args: tuple = (), timeout: float = 300) -> list[Any]:
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.spawn(_entry, args=(fn, world, free_port(), args, out, max(1, torch.get_num_threads() // world)),
                       nprocs=world, join=False)
        import time

        t0 = time.monotonic()
        while not ctx.join(timeout=5):
            if time.monotonic() - t0 > timeout:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"run_ranks({fn.__name__}): no result after {timeout}s")
        res = [torch.load(Path(out) / f"{r}.pt", weights_only=False) for r in range(world)]
    bad = [x["error"] for x in res if not x["ok"]]
    if bad:
        raise AssertionError("\n".join(bad))
    return [x["result"] for x in res]

"""Several processes without changing the DAG: a training or feature stage asked for more than one
process (``dist.nproc_per_node`` x ``dist.nnodes`` > 1) re-runs itself under torchrun
(``python -m torch.distributed.run``, PyTorch's launcher with its elastic agent), so ``dvc repro``
and ``dvc exp run -S dist.nproc_per_node=8`` drive it unchanged.

- one machine: ``--standalone`` (a local rendezvous on a free port);
- several: every node runs the same ``dvc repro`` (or the stage command) with ``dist.nnodes`` and
  ``dist.rdzv_endpoint`` = node 0's host:port (c10d rendezvous); README "Scaling out" has a
  two-node and a SLURM example;
- ``--max-restarts 0``: a process that dies ends the job; torchrun stops the other ranks and the
  stage exits non-zero naming the failed rank; ``dvc repro`` then resumes from the last checkpoint
  (with the same or another number of processes: the sample position is global).

The launcher process itself does no work: it waits for torchrun and exits with its status.
"""
from __future__ import annotations

import subprocess
import sys
from typing import Any

from selfsup import dist


def torchrun_command(cfg: Any, argv: list[str]) -> list[str]:
    """The torchrun command line that runs ``argv`` (a script and its arguments) as ``cfg`` (DistCfg) asks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cfg.nproc_per_node}",
           f"--nnodes={cfg.nnodes}", "--max-restarts=0", "--monitor-interval=1"]
    if cfg.nnodes > 1:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}", f"--rdzv-id={cfg.rdzv_id}"]
    else:
        cmd += ["--standalone"]
    return [*cmd, *argv]


def relaunch_if_needed(cfg: Any, argv: list[str] | None = None) -> None:
    """Under torchrun or with one process: return (the stage runs here). Else run the stage under
    torchrun and exit with its status (never returns)."""
    if cfg.processes == 1 or dist.under_torchrun():
        return
    cmd = torchrun_command(cfg, list(sys.argv if argv is None else argv))
    print(f"launch: {cfg.processes} processes: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    sys.exit(subprocess.run(cmd, check=False).returncode)


def distributed(cfg: Any) -> None:
    """For a training or feature stage, after its config is loaded: re-run under torchrun when
    ``cfg.dist`` asks for several processes (the launcher exits there), else join torchrun's group."""
    relaunch_if_needed(cfg.dist)
    dist.init_from_env(cfg.dist.backend, cfg.dist.timeout_s)

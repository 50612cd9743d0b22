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

The launcher process itself does no training: it follows torchrun and the ranks on this machine and
exits, non-zero on any failure, only once they have all ended (so nothing writes to the stage's outputs
after it failed):

- each rank keeps a record in a temporary folder (``selfsup.core.dist.watch_agent``: pid, then how it
  ended: an exception, a clean exit, its agent gone); the launcher sees every rank end (pidfd, /proc
  on Linux) and, when torchrun fails, prints one line naming the rank that ended first without any
  record, i.e. that was lost (a signal: the out-of-memory killer, SIGKILL; a crash), or else the one
  that failed first, with its error. torchrun's own "root cause" is the failure with the earliest
  timestamp, in whole seconds of when it noticed each, so it often names a rank that only stopped
  after the lost one (its collective failed at once, before torchrun's next look);
- a rank ends as soon as its torchrun agent is gone (its watchdog), and the launcher kills the ranks
  that still run ``GRACE_S`` after torchrun has exited;
- on Linux torchrun gets SIGTERM when the launcher dies (a parent-death signal): it stops its ranks.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from selfsup.core import dist
from selfsup.core.config import ConfigError, one_of, positive

GRACE_S = 5.0  # ranks that still run this long after torchrun exited are killed (their watchdog polls every dist.WATCH_POLL_S)
LOOK_S = 0.2  # how often the launcher looks for new ranks; a rank's end wakes it at once where pidfds exist


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
    sys.exit(run_torchrun(cmd))


def _say(msg: str) -> None:
    print(f"launch: {msg}", file=sys.stderr, flush=True)


def _signal_name(num: int) -> str:
    try:
        return f"signal {num}: {signal.Signals(num).name}"
    except ValueError:
        return f"signal {num}"


def _die_with_parent() -> Callable[[], None] | None:
    """Linux: a ``preexec_fn`` that has the kernel send torchrun SIGTERM when this process dies (it
    then stops its ranks). Safe here: the main thread starts torchrun, and PR_SET_PDEATHSIG follows
    the thread that forked. Resolved before the fork, so the child only makes one call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        if prctl(1, signal.SIGTERM, 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != parent:  # the launcher died before the call above: no signal will come
            os._exit(1)

    return preexec


def run_torchrun(cmd: list[str], grace_s: float = GRACE_S) -> int:
    """Run torchrun's command line ``cmd`` until it and its ranks on this machine have ended; the exit
    status to leave with (torchrun's; 128 + the signal that killed it), after a line naming the rank
    that was lost when it failed."""
    with tempfile.TemporaryDirectory(prefix="selfsup-ranks-") as folder:
        ranks = _Ranks(Path(folder))
        proc = subprocess.Popen(cmd, env={**os.environ, dist.RANK_DIR_ENV: folder}, preexec_fn=_die_with_parent())
        try:
            try:
                rc = ranks.follow(proc)
            except BaseException:
                # interrupted (Ctrl-C): torchrun stops its ranks on SIGTERM, the launcher any it leaves
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait()
                ranks.stop_survivors(grace_s)
                raise
            if rc < 0:
                _say(f"the torchrun agent (pid {proc.pid}) died ({_signal_name(-rc)}); its ranks stop with it")
            ranks.stop_survivors(grace_s)
            if rc > 0:
                _say(f"torchrun failed (exit status {rc}): {ranks.failure()}")
        finally:
            ranks.close()
        return rc if rc >= 0 else 128 - rc


class _Ranks:
    """What the launcher sees of torchrun's ranks on this machine: the record each keeps in ``folder``
    (``selfsup.core.dist.watch_agent``) and the order in which they ended."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.rec: dict[int, dict[str, Any]] = {}  # rank -> its latest record
        self.ended: dict[int, int] = {}  # rank -> the number of the look that found it ended: their order
        self.status: dict[int, int] = {}  # rank -> wait status, where its zombie was seen (Linux)
        self.fds: dict[int, int] = {}  # rank -> pidfd of a running rank: its end wakes the launcher
        self.looks = 0

    def _alive(self, r: int) -> bool:
        pid, start = self.rec[r]["pid"], self.rec[r]["start"]
        if dist.HAVE_PROC:
            stat = dist.proc_stat(pid)
            if stat is None or stat[1] != start:  # gone (or its pid already reused)
                return False
            if stat[0] in "ZX":  # ended, not yet reaped by its agent: its wait status is still there
                self.status[r] = stat[2]
                return False
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: the pid was reused
            return False
        return True

    def look(self) -> None:
        """Read the records; note the ranks that have ended since the last look."""
        self.looks += 1
        for path in self.folder.glob("rank*.json"):
            rec = json.loads(path.read_text())
            self.rec[rec["rank"]] = rec
        for r in self.rec:
            if r in self.ended:
                continue
            if not self._alive(r):
                self.ended[r] = self.looks
                fd = self.fds.pop(r, None)
                if fd is not None:
                    os.close(fd)
            elif r not in self.fds and hasattr(os, "pidfd_open"):
                try:
                    self.fds[r] = os.pidfd_open(self.rec[r]["pid"])
                except ProcessLookupError:  # it has just ended: the next look notes it
                    pass

    def wait(self, timeout: float, agent_fd: int | None = None) -> None:
        """Until a rank (or the agent) ends, ``timeout`` at most."""
        fds = [*self.fds.values(), *([] if agent_fd is None else [agent_fd])]
        if fds:
            select.select(fds, [], [], timeout)
        else:
            time.sleep(timeout)

    def follow(self, proc: subprocess.Popen) -> int:
        """Until torchrun exits: its return code."""
        agent_fd = os.pidfd_open(proc.pid) if hasattr(os, "pidfd_open") else None
        try:
            while proc.poll() is None:
                self.look()
                self.wait(LOOK_S, agent_fd)
        finally:
            if agent_fd is not None:
                os.close(agent_fd)
        self.look()
        return proc.returncode

    def running(self) -> list[int]:
        return sorted(r for r in self.rec if r not in self.ended)

    def stop_survivors(self, grace_s: float) -> None:
        """Wait ``grace_s`` for the ranks still running (torchrun has exited: they end by themselves),
        then kill them, their workers with them."""
        self.look()
        deadline = time.monotonic() + grace_s
        while self.running() and time.monotonic() < deadline:
            self.wait(min(LOOK_S, max(0.0, deadline - time.monotonic())))
            self.look()
        left = self.running()
        if not left:
            return
        for r in left:
            pid = self.rec[r]["pid"]
            try:
                # torchrun starts each rank in a session of its own: its group is the rank and its workers
                if hasattr(os, "killpg") and os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended since the last look
                pass
        deadline = time.monotonic() + grace_s
        while self.running() and time.monotonic() < deadline:
            self.wait(min(LOOK_S, max(0.0, deadline - time.monotonic())))
            self.look()
        names = ", ".join(f"rank {r} (pid {self.rec[r]['pid']})" for r in left)
        stuck = self.running()
        _say(f"{names} still ran {grace_s:g} s after torchrun had exited: killed"
             + (f"; {', '.join(f'rank {r}' for r in stuck)} did not end (uninterruptible sleep?)" if stuck else ""))

    def _how(self, r: int) -> str:
        """How rank ``r`` ended."""
        rec, status = self.rec[r], self.status.get(r)
        if rec["state"] == "error":
            return rec["error"]
        if rec["state"] == "orphaned":
            return "ended by its watchdog: the agent was gone"
        if rec["state"] == "exited":
            return "exited without an exception"
        if status is not None and status & 0x7F:
            return f"killed by {_signal_name(status & 0x7F)}"
        if status is not None:
            return f"exited with status {status >> 8} without a clean shutdown (os._exit or a crash)"
        return "no clean exit recorded"

    def failure(self) -> str:
        """After torchrun failed: which rank failed first, and how. The first to end without any
        record (no exception, no clean exit: a signal, a crash) was lost; the ranks that end at the
        same look with an error were stopped by it (a collective with a dead peer fails at once)."""
        if not self.rec:
            return "no rank joined the process group (see the errors above)"
        order = sorted(self.ended, key=lambda r: (self.ended[r], r))
        if not order:
            return "every rank on this machine was still running"
        first = [r for r in order if self.ended[r] == self.ended[order[0]]]
        silent = [r for r in first if self.rec[r]["state"] == "running"]
        # torchrun stops the other ranks with SIGTERM: at the same look, a SIGTERM was not the loss
        lost = [r for r in silent if self.status.get(r, 0) & 0x7F not in (signal.SIGTERM, signal.SIGINT)] or silent
        if lost:
            head = "; ".join(f"rank {r} (pid {self.rec[r]['pid']}) was lost: {self._how(r)}" for r in lost)
            if not any(r in self.status for r in lost):
                head += " (killed by a signal, e.g. SIGKILL from the out-of-memory killer, or a crash)"
        else:
            r = min(first, key=lambda r: self.rec[r]["time"])
            lost = [r]
            head = f"rank {r} (pid {self.rec[r]['pid']}) failed first: {self._how(r)}"
        after = [r for r in order if r not in lost]
        if after:
            head += "; then " + ", ".join(f"rank {r} ({self._how(r)[:120]})" for r in after)
        return head

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def distributed(cfg: Any) -> None:
    """For a training or feature stage, after its config is loaded: re-run under torchrun when
    ``cfg.dist`` asks for several processes (the launcher exits there), else join torchrun's group."""
    relaunch_if_needed(cfg.dist)
    dist.init_from_env(cfg.dist.backend, cfg.dist.timeout_s)


@dataclass
class DistCfg:
    """Several processes (``selfsup/core/launch.py``): the training and feature stages re-launch
    themselves under torchrun when nproc_per_node x nnodes > 1; DVC drives them unchanged."""

    nproc_per_node: int = 1  # processes on this machine (GPUs; on a CPU: gloo processes)
    nnodes: int = 1  # machines; > 1 needs rdzv_endpoint (every node runs the same command)
    rdzv_endpoint: str = ""  # host:port of the rendezvous (node 0), e.g. node0:29400
    rdzv_id: str = "selfsup"  # the job's rendezvous id (SLURM: $SLURM_JOB_ID)
    backend: str = "auto"  # auto (nccl on GPUs, gloo on CPUs) | nccl | gloo
    # a rank that dies or hangs makes the others stop with an error after this long (collectives'
    # timeout; torchrun itself tears the group down as soon as a process exits)
    timeout_s: float = 300.0

    def check(self, p: str) -> None:
        positive(p, self, "nproc_per_node", "nnodes", "timeout_s")
        one_of(p, "backend", self.backend, ("auto", "nccl", "gloo"))
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError(f"{p}.rdzv_endpoint: dist.nnodes={self.nnodes} needs the host:port of node 0")
        if self.rdzv_endpoint and ":" not in self.rdzv_endpoint:
            raise ConfigError(f"{p}.rdzv_endpoint: need host:port, got {self.rdzv_endpoint!r}")

    @property
    def processes(self) -> int:
        return self.nproc_per_node * self.nnodes

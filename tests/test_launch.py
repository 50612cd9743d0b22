"""selfsup.core.launch under torchrun (2 gloo processes on the CPU): a stage ends only with all its ranks;
killing torchrun's agent leaves no rank alive (their watchdog), killing the launcher stops torchrun
and its ranks, and a lost rank is named by the stage's error, not the rank that stopped after it."""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and process groups")

# a stage as the real ones start: its config asks for 2 processes, selfsup.core.launch.distributed re-runs
# it under torchrun; each rank writes "pid agent-pid launcher-folder", then runs until killed ("busy": in a
# collective most of the time, as training is; "idle": never, so only its watchdog can end it)
STAGE = '''
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from selfsup.core import dist, launch

out, mode = Path(sys.argv[1]), sys.argv[2]
cfg = SimpleNamespace(processes=2, nproc_per_node=2, nnodes=1, rdzv_endpoint="", rdzv_id="test", backend="gloo",
                      timeout_s=60.0)
launch.distributed(SimpleNamespace(dist=cfg))
tmp = out / f"rank{dist.rank()}.tmp"
tmp.write_text(f"{os.getpid()} {os.getppid()} {os.environ['SELFSUP_RANK_DIR']}")
tmp.replace(out / f"rank{dist.rank()}.pid")
end = time.monotonic() + 180  # should every kill of the test miss it
while time.monotonic() < end:
    if mode == "busy":
        dist.all_reduce(torch.ones(1))
    time.sleep(0.02)
'''


def _gone(pid):
    """Ended (a zombie that nobody reaped yet counts: it runs no more)."""
    from selfsup.core import dist

    if dist.HAVE_PROC:
        stat = dist.proc_stat(pid)
        return stat is None or stat[0] in "ZX"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _until(pred, timeout):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@contextlib.contextmanager
def _stage(tmp_path, mode):
    """(the launcher's Popen, {rank: (pid, agent pid)}, its stderr file); every process killed after."""
    (tmp_path / "stage.py").write_text(STAGE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    err = tmp_path / "stderr.txt"
    pids, rank_dirs = {}, set()
    with open(err, "w") as f:
        # a file, not a pipe: the ranks inherit it, and a pipe would stay open as long as any lives
        launcher = subprocess.Popen([sys.executable, str(tmp_path / "stage.py"), str(tmp_path), mode], env=env,
                                    stdout=f, stderr=f, cwd=tmp_path)
    try:
        def started():
            for r in (0, 1):
                if r not in pids and (tmp_path / f"rank{r}.pid").exists():
                    pid, agent, rank_dir = (tmp_path / f"rank{r}.pid").read_text().split()
                    pids[r] = int(pid), int(agent)
                    rank_dirs.add(rank_dir)
            assert launcher.poll() is None, err.read_text()[-3000:]
            return len(pids) == 2

        assert _until(started, 180), f"the ranks did not start: {err.read_text()[-3000:]}"
        assert pids[0][1] == pids[1][1]  # one agent
        yield launcher, pids, err
    finally:
        for pid in [launcher.pid, *{p for pair in pids.values() for p in pair}]:
            if not _gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        launcher.wait(timeout=60)
        for folder in rank_dirs:  # the launcher's, left behind when the test killed it
            if os.path.isdir(folder):
                shutil.rmtree(folder)


def test_killing_the_agent_leaves_no_rank_alive(tmp_path):
    with _stage(tmp_path, "idle") as (launcher, pids, err):
        agent = pids[0][1]
        os.kill(agent, signal.SIGKILL)
        assert _until(lambda: all(_gone(pid) for pid, _ in pids.values()), 15), \
            f"ranks alive 15 s after their agent was killed: {err.read_text()[-3000:]}"
        rc = launcher.wait(timeout=60)
        text = err.read_text()
        assert rc == 128 + signal.SIGKILL, text[-3000:]
        assert f"launch: the torchrun agent (pid {agent}) died (signal 9: SIGKILL)" in text, text[-3000:]
        for r, (pid, _) in pids.items():  # each ended by its own watchdog, not by the launcher's last resort
            assert f"rank {r} (pid {pid}): its torchrun agent (pid {agent}) is gone" in text, text[-3000:]
        assert "still ran" not in text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_killing_the_launcher_stops_torchrun_and_its_ranks(tmp_path):
    with _stage(tmp_path, "idle") as (launcher, pids, err):
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=60)
        procs = [pids[0][1], *(pid for pid, _ in pids.values())]
        assert _until(lambda: all(_gone(pid) for pid in procs), 15), \
            f"torchrun or ranks alive 15 s after the launcher was killed: {err.read_text()[-3000:]}"


@pytest.mark.parametrize("mode", ["busy", "idle"])
def test_the_error_names_the_lost_rank(tmp_path, mode):
    """busy: rank 0's collective fails as rank 1 dies; idle: torchrun stops rank 0 with SIGTERM. Both
    times the stage's error names rank 1 only."""
    with _stage(tmp_path, mode) as (launcher, pids, err):
        os.kill(pids[1][0], signal.SIGKILL)
        rc = launcher.wait(timeout=90)
        text = err.read_text()
        assert rc != 0 and all(_gone(pid) for pid, _ in pids.values()), text[-3000:]
        line = [ln for ln in text.splitlines() if ln.startswith("launch: torchrun failed")]
        assert len(line) == 1, text[-3000:]
        assert f"rank 1 (pid {pids[1][0]}) was lost" in line[0], line[0]
        assert line[0].count("was lost") == 1 and "rank 0 (pid" not in line[0], line[0]
        assert "then rank 0 (" in line[0], line[0]


def test_the_first_rank_to_end_without_a_record_was_lost():
    """The launcher's verdict from what it saw (no processes): the order of the ends decides; at the
    same look, a rank that raised or got torchrun's SIGTERM was stopped by the other."""
    from pathlib import Path

    from selfsup.core.launch import _Ranks

    def verdict(recs, ended, status=None):
        ranks = _Ranks(Path("."))
        ranks.rec = {r: {"rank": r, "pid": 100 + r, "time": float(r), **rec} for r, rec in recs.items()}
        ranks.ended, ranks.status = ended, status or {}
        return ranks.failure()

    running, error = {"state": "running"}, {"state": "error", "error": "RuntimeError: Connection closed by peer"}
    # rank 1 killed first, rank 0 stopped by torchrun later: torchrun's root cause may name rank 0
    v = verdict({0: running, 1: running}, {1: 3, 0: 4}, {1: signal.SIGKILL})
    assert v.startswith("rank 1 (pid 101) was lost: killed by signal 9: SIGKILL; then rank 0 (")
    assert v.count("lost") == 1
    # both seen ended at the same look: the one torchrun stopped with SIGTERM was not the loss
    v = verdict({0: running, 1: running}, {0: 3, 1: 3}, {0: signal.SIGTERM, 1: signal.SIGKILL})
    assert v.startswith("rank 1 (pid 101) was lost") and "rank 0 (killed by signal 15: SIGTERM)" in v
    # at the same look, a collective that failed because its peer died
    v = verdict({0: error, 1: running}, {0: 3, 1: 3})
    assert v.startswith("rank 1 (pid 101) was lost: no clean exit recorded") and "rank 0 (RuntimeError" in v
    # an exception first: that rank failed, the other was stopped after it
    v = verdict({0: running, 1: error}, {1: 2, 0: 3}, {0: signal.SIGTERM})
    assert v.startswith("rank 1 (pid 101) failed first: RuntimeError: Connection closed by peer; then rank 0 (")
    assert verdict({}, {}) == "no rank joined the process group (see the errors above)"

"""Test-only fault injection, loaded by Python at start-up when this folder is on PYTHONPATH.

``SELFSUP_KILL_AT="rank,epoch,batch"`` (0-based epoch, batches done): the process of that rank
dies by SIGKILL right after that batch, as a lost machine would. It wraps
``selfsup.engine.loop.pretrain`` with an ``on_step`` callback, so the production loop carries no fault
hook (tests/test_distributed.py runs the pretrain stage under torchrun with it)."""
from __future__ import annotations

import os

if "SELFSUP_KILL_AT" in os.environ:
    import signal

    import selfsup.engine.loop as _train
    from selfsup.core import dist as _dist

    _at = tuple(int(v) for v in os.environ["SELFSUP_KILL_AT"].split(","))
    _pretrain = _train.pretrain

    def _pretrain_with_fault(*args, on_step=None, **kwargs):
        def step(epoch: int, batch: int) -> None:
            if on_step is not None:
                on_step(epoch, batch)
            if (_dist.rank(), epoch, batch) == _at:
                os.kill(os.getpid(), signal.SIGKILL)

        return _pretrain(*args, on_step=step, **kwargs)

    _train.pretrain = _pretrain_with_fault

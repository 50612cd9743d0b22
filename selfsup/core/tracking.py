"""MLflow: one run per (DVC experiment, method), live while the method trains.

``pretrain-<m>`` opens the run (``LiveRun.start``), logs its curves while it trains (``log``) and
closes it (``end``); the later stages (extract, knn, linear, cluster, voc, report) add their
numbers, params and files to the same run (``LiveRun.attach``). The run of a method is the
latest one with its tags ``method`` and ``dvc_experiment`` (``DVC_EXP_NAME``, set by
``dvc exp run``; absent for the workspace).

DVC's metric files are the source of truth; MLflow is a view. Every MLflow call of the process
runs on one worker thread; a caller waits for it (``start``, ``attach``, ``end``, params,
artifacts) at most for what is left of a time budget (``BUDGET_S``, shared by all the calls and
runs of the process, i.e. of a stage, plus ``BUDGET_S`` more per method ``stages/pretrain.py``
trains: ``grant``), and ``log`` does not wait at all (the worker batches the
metrics in the background). The one-time local set-up (importing MLflow, creating or upgrading
the SQLite database: ~4 s here, benchmarks/imports.py) is waited for apart, up to ``SETUP_S``, so a
slow machine does not switch MLflow off. The first failure (store unreachable, locked database,
budget spent) logs ONE warning and switches MLflow off for the rest of the process: every later
call returns at once. HTTP retries are switched off and timeouts shortened before MLflow is imported.

The experiment carries ``mlflow.experimentKind = custom_model_development`` (MLflow 3's
"machine learning" kind, whose experiment page is the runs table). MLflow 3.17's own UI reads the
kind from its sidebar switch instead (``?workflowType=machine_learning`` in the URL, else the
browser's last choice, "genai" by default), so ``LiveRun.ui_path`` is a link with that query.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import math
import numbers
import os
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pandas as pd

from selfsup.core.config import ConfigError

log = logging.getLogger("selfsup.core.tracking")

BUDGET_S = 5.0  # the most one process (one stage) waits for the tracking store, all calls together
SETUP_S = 60.0  # the most it waits, once, for the local set-up (import MLflow + a new SQLite store: benchmarks/imports.py)
HTTP_TIMEOUT_S = "3"  # per HTTP request (MLflow reads it as an int); no retries
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3: "machine learning", opens on the runs table
TERMINAL = ("FINISHED", "FAILED", "KILLED")
_MAX_PENDING = 1_000_000  # metrics waiting for the worker; more means the store cannot keep up


def tracking_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store at the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def run_params(cfg: Any, method: str) -> dict[str, Any]:
    """What a method's run logs as params: the shared config (not the other methods' blocks) and
    ``method.*``: its name, upstream and block."""
    d = cfg.to_dict()
    shared = {k: v for k, v in d.items() if k not in set(cfg.method_cfgs) | {"methods", "mlflow"}}
    block = d.get(method) or {}
    return {**shared, "method": {"name": method, "upstream": cfg.methods.get(method), **flatten(block)}}


def _git_commit(root: Path) -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout.strip() if r.returncode == 0 else ""


def _ms() -> int:
    return int(time.time() * 1000)


def _key(k: Any) -> str:
    """A name MLflow accepts for a metric or param: its characters, no empty / relative parts."""
    s = re.sub(r"[^/\w.\- :]", "_", str(k))
    s = "/".join(p if p not in (".", "..") else p.replace(".", "_") for p in s.split("/") if p)
    return s[:250] or "_"


def _number(v: Any) -> float | None:
    """``v`` as a float if it is a number (NaN, bools, strings: None); 0-d tensors / arrays pass."""
    if not isinstance(v, numbers.Real) and hasattr(v, "item"):
        try:
            v = v.item()
        except (TypeError, ValueError, RuntimeError):
            return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    f = float(v)
    return None if math.isnan(f) else f


def _quote(s: str) -> str:
    return f'"{s}"' if "'" in s else f"'{s}'"


# --------------------------------------------------------------------------- the worker


class _Job:
    __slots__ = ("fn", "args", "done", "result", "ok")

    def __init__(self, fn: Callable[..., Any], args: tuple):
        self.fn, self.args, self.done, self.result, self.ok = fn, args, threading.Event(), None, False


class _Link:
    """This process's one road to MLflow: the worker thread that makes every MLflow call, the time
    budget of the callers' waits, and the switch the first failure turns off."""

    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.waited = 0.0  # by the callers, in finished waits
        self._since: float | None = None  # start of the wait in progress
        self.dead = False
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.clients: dict[str, Any] = {}
        self.experiments: dict[tuple[str, str], str] = {}

    def submit(self, fn: Callable[..., Any], *args: Any) -> _Job | None:
        if self.dead:
            return None
        with self._lock:
            if self._thread is None:  # a daemon: a hung call never keeps the process alive
                self._thread = threading.Thread(target=self._loop, name="selfsup-mlflow", daemon=True)
                self._thread.start()
        job = _Job(fn, args)
        self._jobs.put(job)
        return job

    def call(self, fn: Callable[..., Any], *args: Any, what: str, uri: str) -> tuple[bool, Any]:
        """Run ``fn(*args)`` on the worker, waiting at most what is left of the budget: (ok, result).
        The first call for ``uri`` first waits (up to ``SETUP_S``, outside the budget) for the
        local set-up: importing MLflow, and for SQLite creating or upgrading the database."""
        if uri not in self.clients:
            setup = self.submit(_client, uri)
            if setup is None:
                return False, None
            if not setup.done.wait(SETUP_S):
                self.fail(f"{what}: MLflow's set-up took over {SETUP_S:g} s", None)
            if not setup.ok:
                return False, None
        job = self.submit(fn, *args)
        if job is None:
            return False, None
        self._since = time.perf_counter()
        done = job.done.wait(max(0.0, self.budget_s - self.waited))
        self.waited += time.perf_counter() - self._since
        self._since = None
        if not done:
            self.fail(f"{what}: the {self.budget_s:g} s budget for MLflow is spent", None)
        return job.ok, job.result

    def stop(self) -> None:
        self.dead = True
        if self._thread is not None:
            self._jobs.put(None)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            if not self.dead:
                try:
                    job.result, job.ok = job.fn(*job.args), True
                except Exception as e:  # noqa: BLE001 - by design: MLflow is optional, DVC's files are the record
                    self.fail(f"{getattr(job.fn, '__name__', 'call')}", e)
            job.done.set()

    def fail(self, what: str, e: BaseException | None) -> None:
        with self._lock:
            if self.dead:
                return
            self.dead = True
        since = self._since
        waited = self.waited + (time.perf_counter() - since if since is not None else 0.0)
        detail = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}" if e is not None else what
        log.warning("MLflow logging failed after %.1fs (%s); MLflow is off for the rest of this stage, "
                    "results are in DVC's metric files", waited, detail)


_LINK = _Link(BUDGET_S)


def grant(budget_s: float = BUDGET_S) -> None:
    """More waiting time for this process: a stage that serves several methods in turn (the
    ``pretrain`` stage) grants each its own budget. A switched-off MLflow stays off."""
    _LINK.budget_s += budget_s


def reset(budget_s: float = BUDGET_S) -> None:
    """A fresh worker, budget and switch (tests; a notebook after the store came back)."""
    global _LINK
    _LINK.stop()
    _LINK = _Link(budget_s)


def _client(uri: str) -> Any:
    """The MlflowClient of ``uri`` (worker thread only)."""
    c = _LINK.clients.get(uri)
    if c is None:
        # before MLflow is imported: a dead server must fail at once, not after minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S)
        from mlflow.tracking import MlflowClient

        c = _LINK.clients[uri] = MlflowClient(tracking_uri=uri)
    return c


def _experiment(client: Any, uri: str, name: str, root: Path) -> str:
    """The id of experiment ``name``, created (runs-table kind, artifacts under <root>/mlartifacts) if missing."""
    if (uri, name) in _LINK.experiments:
        return _LINK.experiments[(uri, name)]
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name, artifact_location=(root / "mlartifacts").resolve().as_uri(),
                                              tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created meanwhile by a stage running in parallel
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp is not None:
        if exp.lifecycle_stage != "active":
            raise RuntimeError(f"experiment {name!r} is deleted (restore it, or `mlflow gc` it for a fresh one)")
        exp_id = exp.experiment_id
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made by older code: make it open on the runs table
            client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    _LINK.experiments[(uri, name)] = exp_id
    return exp_id


def _dataset_input(meta: Mapping[str, Any]) -> Any:
    """An MLflow dataset input from a dataset description (``data/dataset/meta.json``'s keys)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    src = str(meta.get("source", ""))
    if src.startswith(("http://", "https://")):
        kind, source = "http", {"url": src}
    elif src.startswith(("/", "file:")) or (src and Path(src).exists()):
        kind, source = "local", {"uri": src}
    else:  # e.g. sklearn.datasets.load_digits, torchvision.datasets.CIFAR10
        kind, source = "code", {"uri": src}
    # the digest identifies the prepared data (source, caps, statistics), not only the source file
    digest = str(meta.get("digest") or hashlib.sha256(
        json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16])[:36]
    profile = {k: meta[k] for k in ("format", "n_train", "n_test", "image_size", "channels", "source_sha256")
               if meta.get(k) is not None}
    if isinstance(meta.get("classes"), (list, tuple)):
        profile["num_classes"] = len(meta["classes"])
    schema = None
    size, channels = meta.get("image_size"), meta.get("channels")
    if isinstance(size, (list, tuple)) and len(size) >= 2 and isinstance(channels, int):
        h, w = size[:2]  # MLflow's tensor-spec schema: uint8 NHWC images, int64 labels
        schema = json.dumps({"mlflow_tensorspec": {
            "features": json.dumps([{"name": "image", "type": "tensor",
                                     "tensor-spec": {"dtype": "uint8", "shape": [-1, h, w, channels]}}]),
            "targets": json.dumps([{"name": "label", "type": "tensor",
                                    "tensor-spec": {"dtype": "int64", "shape": [-1]}}])}})
    ds = Dataset(name=str(meta.get("name", "dataset"))[:500], digest=digest, source_type=kind,
                 source=json.dumps(source), schema=schema, profile=json.dumps(profile, default=str))
    return DatasetInput(ds, tags=[InputTag("mlflow.data.context", "train")])


# --------------------------------------------------------------------------- the run

_OPEN: set[LiveRun] = set()  # open runs, ended at exit if the stage did not


class LiveRun:
    """The MLflow run of (DVC experiment, method) in experiment ``experiment`` of the store at ``root``.

    ``start`` (training) or ``attach`` (later stages) opens it; ``log``, ``log_params`` and
    ``log_artifacts`` add to it; ``end`` closes it. With ``enabled=False``, or once MLflow has
    failed in this process, every method returns at once and ``run_id`` stays None. Also a
    context manager: leaving the block ends the run (FAILED / KILLED on an exception from a
    started run; an attached run keeps its status).
    """

    def __init__(self, root: Path, experiment: str, method: str, enabled: bool = True):
        self.root = Path(root)
        self.experiment = experiment
        self.method = method
        self.enabled = enabled
        self.dvc_experiment: str | None = os.environ.get("DVC_EXP_NAME") or None
        self.uri = tracking_uri(self.root)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.started = False  # by start(): a training run; else attached
        self._prior: str | None = None  # the status of an attached run when opened
        self._metric_keys: set[str] = set()  # metric names the run had when opened
        self._ended = False
        self._pending: list[tuple[str, float, int, int]] = []
        self._flush_queued = False
        self._plock = threading.Lock()

    # ------------------------------------------------------------------ public

    @property
    def active(self) -> bool:
        """Open, and MLflow still working in this process."""
        return self.run_id is not None and not self._ended and not _LINK.dead

    @property
    def ui_path(self) -> str | None:
        """The run's page in the MLflow UI, relative to the server's address, in the ML (runs) workflow."""
        if self.run_id is None:
            return None
        return f"#/experiments/{self.experiment_id}/runs/{self.run_id}?workflowType=machine_learning"

    def start(self, params: Mapping[str, Any] | None = None, dataset: Mapping[str, Any] | None = None,
              resume: bool = False) -> str | None:
        """Training starts: a new run (start time now), or with ``resume`` the latest run of
        (DVC experiment, method) set back to RUNNING (a new one if there is none). Logs the
        params (flattened) and ``dataset`` (e.g. ``meta.json``) as the run's input. Returns the run id."""
        if not self.enabled:
            return None
        if self.run_id is not None:
            raise RuntimeError(f"LiveRun({self.method!r}) is already open")
        self.started = True
        self._open(reuse=resume, running=True, start_ms=_ms(), params=params, dataset=dataset, what="start")
        return self.run_id

    @classmethod
    def attach(cls, root: Path, experiment: str, method: str, enabled: bool = True) -> LiveRun:
        """For the stages after training: the latest run of (DVC experiment, method), or a new one
        (finished at ``end``) if there is none. Its status stays as it is until ``end``."""
        r = cls(root, experiment, method, enabled)
        if enabled:
            r._open(reuse=True, running=False, start_ms=_ms(), params=None, dataset=None, what="attach")
        return r

    def log(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Metrics at ``step`` (numbers only: NaN, bools, strings are skipped); never waits: the
        worker sends them in batches. The timestamp is now."""
        if not self.active:
            return
        ts = _ms()
        items = [(_key(k), f, ts, int(step)) for k, v in metrics.items() if (f := _number(v)) is not None]
        if not items:
            return
        with self._plock:
            self._pending.extend(items)
            schedule, self._flush_queued = not self._flush_queued, True
            backlog = len(self._pending)
        if backlog > _MAX_PENDING:
            _LINK.fail("log", RuntimeError(f"{backlog} metrics waiting: the store cannot keep up"))
        elif schedule:
            _LINK.submit(self._flush)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params, flattened (``a.b.c``), values cut at 6000 characters. MLflow's params cannot
        change: a key the run already has with another value is kept as it was (and logged at INFO)."""
        if self.active and params:
            _LINK.call(self._log_params, dict(params), what="log_params", uri=self.uri)

    def log_artifacts(self, paths: Iterable[Path | str], artifact_path: str | None = None) -> None:
        """Files or folders into the run's artifacts (under ``artifact_path``); missing ones are skipped."""
        if self.active:
            _LINK.call(self._log_artifacts, [Path(p) for p in paths], artifact_path, what="log_artifacts",
                       uri=self.uri)

    def end(self, status: str | None = None) -> None:
        """Send what is pending and terminate the run with end time now. ``status``: FINISHED,
        FAILED or KILLED; by default FINISHED for a started run; an attached run keeps its own
        status (FINISHED, FAILED, KILLED: re-terminated, end time now; RUNNING: left running), and
        one that ``attach`` created ends FINISHED."""
        if status is not None and status not in TERMINAL:
            raise ValueError(f"status: one of {TERMINAL}, got {status!r}")
        if not self.active:
            self._ended = True
            return
        if status is None and self.started:
            status = "FINISHED"
        elif status is None:  # attached: a finished run stays so, a running one (still training) runs on
            status = self._prior if self._prior in TERMINAL + ("RUNNING",) else "FINISHED"
        end_ms = _ms()
        self._ended = True
        _OPEN.discard(self)
        _LINK.call(self._terminate, status, end_ms, what="end", uri=self.uri)

    def __enter__(self) -> LiveRun:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None or not self.started:
            self.end()
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    # ------------------------------------------------------------------ caller side

    def _open(self, *, reuse: bool, running: bool, start_ms: int, params: Mapping[str, Any] | None,
              dataset: Mapping[str, Any] | None, what: str) -> None:
        ok, _ = _LINK.call(self._open_job, reuse, running, start_ms, params, dataset, what=what, uri=self.uri)
        if ok and self.run_id is not None:
            _OPEN.add(self)
            log.info("MLflow: run %s of %s (%s, experiment %r, %s)%s", self.run_id, self.method,
                     self.dvc_experiment or "workspace", self.experiment, self.uri,
                     f": {self.uri.rstrip('/')}/{self.ui_path}" if self.uri.startswith("http") else "")
        else:
            self.run_id = None

    # ------------------------------------------------------------------ worker side

    def _open_job(self, reuse: bool, running: bool, start_ms: int, params: Mapping[str, Any] | None,
                  dataset: Mapping[str, Any] | None) -> None:
        client = _client(self.uri)
        exp_id = _experiment(client, self.uri, self.experiment, self.root)
        run = None
        if reuse:
            where = f"tags.method = {_quote(self.method)} AND " + (
                f"tags.dvc_experiment = {_quote(self.dvc_experiment)}" if self.dvc_experiment
                else "tags.dvc_experiment IS NULL")
            found = client.search_runs([exp_id], where, max_results=1, order_by=["attributes.start_time DESC"])
            run = found[0] if found else None
        if run is None:
            tags = {"method": self.method, "git_commit": _git_commit(self.root)}
            if self.dvc_experiment:
                tags["dvc_experiment"] = self.dvc_experiment
            run = client.create_run(exp_id, start_time=start_ms, tags=tags, run_name=self.method)
            self._prior = None
        else:
            self._prior = run.info.status
            self._metric_keys = set(run.data.metrics)
            if running and run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")
        self.experiment_id, self.run_id = exp_id, run.info.run_id
        if params:
            self._log_params(params, run.data.params)
        if dataset:
            client.log_inputs(self.run_id, datasets=[_dataset_input(dataset)])

    def _log_params(self, params: Mapping[str, Any], existing: Mapping[str, str] | None = None) -> None:
        from mlflow.entities import Param

        client = _client(self.uri)
        if existing is None:
            existing = client.get_run(self.run_id).data.params
        new, kept = [], []
        for k, v in flatten(dict(params)).items():
            k, v = _key(k), str(v)[:6000]
            if k not in existing:
                new.append(Param(k, v))
            elif existing[k] != v:
                kept.append(k)
        if kept:
            log.info("MLflow: run %s keeps its earlier value of %d params (%s)", self.run_id, len(kept),
                     ", ".join(kept[:10]) + (", ..." if len(kept) > 10 else ""))
        for i in range(0, len(new), 100):  # log_batch takes at most 100 params a call
            client.log_batch(self.run_id, params=new[i : i + 100])

    def _flush(self) -> None:
        from mlflow.entities import Metric

        with self._plock:
            items, self._pending, self._flush_queued = self._pending, [], False
        client = _client(self.uri)
        for i in range(0, len(items), 1000):  # and at most 1000 metrics
            client.log_batch(self.run_id, metrics=[Metric(*m) for m in items[i : i + 1000]])

    def _log_artifacts(self, paths: list[Path], artifact_path: str | None) -> None:
        client = _client(self.uri)
        for p in paths:
            if p.is_dir():
                client.log_artifacts(self.run_id, str(p), artifact_path)
            elif p.is_file():
                client.log_artifact(self.run_id, str(p), artifact_path)
            else:
                log.info("MLflow: no artifact %s", p)

    def _terminate(self, status: str, end_ms: int) -> None:
        self._flush()
        if status != "RUNNING":
            _client(self.uri).set_terminated(self.run_id, status, end_time=end_ms)


@atexit.register
def _end_open_runs() -> None:
    """A stage that exits without ``end``: a started run ends FAILED (KILLED after Ctrl-C), or
    FINISHED on a clean exit; an attached run keeps its status. Bounded by the budget."""
    crashed = getattr(sys, "last_type", None)
    for r in list(_OPEN):
        if r.started and crashed is not None:
            r.end("KILLED" if issubclass(crashed, KeyboardInterrupt) else "FAILED")
        else:
            r.end()


# --------------------------------------------------------------------------- the report stage


def log_runs(
    root: Path, experiment: str, params: dict[str, dict[str, Any]], finals: dict[str, dict[str, float]],
    histories: dict[str, pd.DataFrame], artifacts: list[Path],
) -> list[str] | None:
    """Add each method's params, final metrics (step 0), per-epoch history (``epoch/<column>`` at
    step = epoch, only for names the run does not have yet, e.g. from live logging) and the
    artifacts (``.png`` under ``plots/``) to its run (``LiveRun.attach``). Returns the run ids, or
    None (with one warning) if MLflow failed."""
    t0 = time.perf_counter()
    ids = []
    for m, p in params.items():
        r = LiveRun.attach(root, experiment, m)
        if r.run_id is None:
            return None
        r.log_params(p)
        r.log(finals.get(m, {}), step=0)
        h = histories.get(m)
        if h is not None and "epoch" in h.columns:
            for col in h.columns:
                if col == "epoch" or _key(f"epoch/{col}") in r._metric_keys:
                    continue
                for ep, v in zip(h["epoch"], h[col]):
                    r.log({f"epoch/{col}": v}, step=int(ep))
        pngs = [a for a in artifacts if Path(a).suffix == ".png"]
        r.log_artifacts([a for a in artifacts if Path(a).suffix != ".png"])
        if pngs:
            r.log_artifacts(pngs, artifact_path="plots")
        r.end()
        if _LINK.dead:
            return None
        ids.append(r.run_id)
    log.info("MLflow: logged %d runs to %s (experiment %r) in %.1fs", len(ids), tracking_uri(root), experiment,
             time.perf_counter() - t0)
    return ids


@dataclass
class MlflowCfg:
    enabled: bool = True
    experiment: str = "selfsup"

    def check(self, p: str) -> None:
        if not self.experiment:
            raise ConfigError(f"{p}.experiment: must not be empty")

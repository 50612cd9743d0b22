"""MLflow view: store location, live runs of (DVC experiment, method), and a dead or slow server
costs seconds, not minutes."""
import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from selfsup.core import tracking
from selfsup.core.io import repo_root
from selfsup.core.tracking import LiveRun, flatten, log_runs, tracking_uri


def test_store_resolves_to_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert repo_root() == (tmp_path / "repo").resolve()
    # queued experiments run in a temp copy under .dvc/tmp/exps: map back to the real repo
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "run" / "abc123"))
    assert repo_root() == (tmp_path / "repo").resolve()
    assert tracking_uri(repo_root()) == f"sqlite:///{(tmp_path / 'repo' / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(repo_root()) == "http://127.0.0.1:5000"


def test_outside_dvc_the_root_is_found_from_a_folder_with_its_own_dvc_yaml(tmp_path, monkeypatch):
    """A sub-folder may hold a dvc.yaml too (the earlier pipelines/<m>/ layout, a nested DVC file): the
    root is the folder with params.yaml beside its dvc.yaml."""
    monkeypatch.delenv("DVC_ROOT", raising=False)
    sub = tmp_path / "repo" / "pipelines" / "moco"
    sub.mkdir(parents=True)
    for f in (tmp_path / "repo" / "dvc.yaml", tmp_path / "repo" / "params.yaml", sub / "dvc.yaml"):
        f.write_text("{}")
    monkeypatch.chdir(sub)
    assert repo_root() == (tmp_path / "repo").resolve()


def test_dead_server_warns_once_and_returns_fast(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    t0 = time.perf_counter()
    out = log_runs(tmp_path, "x", {"m": {"a": 1}}, {"m": {"top1": 1.0}}, {"m": pd.DataFrame({"epoch": [1], "loss": [2.0]})}, [])
    assert out is None
    assert time.perf_counter() - t0 < 20
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "MLflow logging failed" in warnings[0].message


def test_local_store_holds_params_history_metrics(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    art = tmp_path / "results.md"
    art.write_text("# r\n")
    hist = pd.DataFrame({"epoch": [1, 2, 3], "loss": [3.0, 2.0, 1.5]})
    ids = log_runs(tmp_path, "exp", {"a": {"method": {"k": 5}}, "b": {"method": {"k": 7}}},
                   {"a": {"top1": 90.0}, "b": {"top1": 80.0}}, {"a": hist, "b": hist}, [art])
    assert ids is not None and len(ids) == 2
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = c.get_run(ids[0])
    assert run.data.params["method.k"] == "5" and run.data.metrics["top1"] == 90.0
    assert [m.value for m in c.get_metric_history(ids[0], "epoch/loss")] == [3.0, 2.0, 1.5]
    assert [a.path for a in c.list_artifacts(ids[0])] == ["results.md"]
    assert Path(run.info.artifact_uri.replace("file://", "")).is_relative_to(tmp_path)


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


# --------------------------------------------------------------------------- live runs

DIGITS = {"name": "digits", "classes": list(range(10)), "n_train": 1437, "n_test": 360, "image_size": [8, 8],
          "channels": 1, "source": "sklearn.datasets.load_digits", "source_sha256": "ab" * 32}


@pytest.fixture(autouse=True)
def fresh_link(monkeypatch):
    """Each test: its own worker, budget and switch; the workspace, the local store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    tracking.reset()
    yield
    tracking.reset()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the live-run tests (creating one costs ~1.5 s); each test has its own experiment."""
    return tmp_path_factory.mktemp("repo")


def client(root):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def test_live_run_logs_while_it_runs(store):
    t0 = time.time()
    run = LiveRun(store, "live", "moco")
    rid = run.start({"method": {"k": 5, "queue": 4096}, "seed": 0}, DIGITS)
    t1 = time.time()
    assert rid is not None and run.active
    c = client(store)
    assert c.get_run(rid).info.status == "RUNNING" and c.get_run(rid).info.end_time is None
    for step in (10, 20, 30):
        run.log({"loss": 1.0 / step, "lr": 0.1, "nan": float("nan"), "name": "x", "flag": True, "acc@1": 50 + step},
                step)
    run.log({"epoch_loss": 0.5}, step=1)
    sum(i * i for i in range(200_000))  # a little training
    t2 = time.time()
    run.end()
    t3 = time.time()
    assert not run.active

    r = c.get_run(rid)
    assert r.info.status == "FINISHED"
    assert r.data.params == {"method.k": "5", "method.queue": "4096", "seed": "0"}
    assert r.data.tags["method"] == "moco" and r.data.tags["mlflow.runName"] == "moco"
    assert "dvc_experiment" not in r.data.tags and "git_commit" in r.data.tags
    assert [(m.step, m.value) for m in c.get_metric_history(rid, "loss")] == [(10, 0.1), (20, 0.05), (30, 1 / 30)]
    assert [m.step for m in c.get_metric_history(rid, "acc_1")] == [10, 20, 30]  # a name MLflow accepts
    assert set(r.data.metrics) == {"loss", "lr", "acc_1", "epoch_loss"}  # no NaN, strings or bools
    # the real times: the start() call to the end() call, not a 50 ms blip at the end
    start, end = r.info.start_time, r.info.end_time
    assert int(t0 * 1000) <= start <= int(t1 * 1000) + 1  # set in start()
    assert int(t2 * 1000) <= end <= int(t3 * 1000) + 1  # set in end()
    assert end - start >= int((t2 - t1) * 1000)
    (ds,) = r.inputs.dataset_inputs
    assert ds.dataset.name == "digits" and len(ds.dataset.digest) == 16 and ds.dataset.source_type == "code"
    assert json.loads(ds.dataset.source) == {"uri": "sklearn.datasets.load_digits"}
    assert json.loads(ds.dataset.profile)["n_train"] == 1437
    assert "mlflow_tensorspec" in json.loads(ds.dataset.schema)
    assert [(t.key, t.value) for t in ds.tags] == [("mlflow.data.context", "train")]


def test_resume_and_later_stages_use_the_same_run(store):
    c = client(store)
    first = LiveRun(store, "resume", "simclr")
    rid = first.start({"k": 1}, DIGITS)
    first.log({"epoch/loss": 2.0}, step=1)
    first.end("KILLED")  # the training was killed after epoch 1
    assert c.get_run(rid).info.status == "KILLED"

    again = LiveRun(store, "resume", "simclr")
    assert again.start({"k": 1}, DIGITS, resume=True) == rid
    assert c.get_run(rid).info.status == "RUNNING"
    with LiveRun.attach(store, "resume", "simclr") as peek:  # e.g. a report while it trains
        assert peek.run_id == rid
    assert c.get_run(rid).info.status == "RUNNING"
    again.log({"epoch/loss": 1.0}, step=2)
    again.end()
    finished = c.get_run(rid).info
    assert finished.status == "FINISHED"

    # a later stage adds to it; its status stays FINISHED, its end time moves to now
    with LiveRun.attach(store, "resume", "simclr") as knn:
        assert knn.run_id == rid
        knn.log({"knn.top1": 91.5})
        knn.log_params({"knn": {"k": 200}})
    r = c.get_run(rid)
    assert r.info.status == "FINISHED" and r.info.end_time >= finished.end_time
    assert r.data.metrics["knn.top1"] == 91.5 and r.data.params["knn.k"] == "200"
    assert [m.step for m in c.get_metric_history(rid, "epoch/loss")] == [1, 2]
    assert len(r.inputs.dataset_inputs) == 1

    # the report stage's log_runs too, without repeating a history the run has
    hist = pd.DataFrame({"epoch": [1, 2], "loss": [2.0, 1.0], "nmi": [0.1, 0.2]})
    assert log_runs(store, "resume", {"simclr": {"k": 1}}, {"simclr": {"top1": 90.0}}, {"simclr": hist}, []) == [rid]
    assert [m.step for m in c.get_metric_history(rid, "epoch/loss")] == [1, 2]
    assert [m.step for m in c.get_metric_history(rid, "epoch/nmi")] == [1, 2]
    assert c.get_run(rid).data.metrics["top1"] == 90.0
    # a fresh (not resumed) training is a new run, and the later stages follow it
    fresh = LiveRun(store, "resume", "simclr")
    rid2 = fresh.start({"k": 1}, DIGITS)
    fresh.end()
    assert rid2 != rid
    assert LiveRun.attach(store, "resume", "simclr").run_id == rid2


CRASH = """
import sys
from pathlib import Path
from selfsup.core.tracking import LiveRun
run = LiveRun(Path(sys.argv[1]), "crash", "moco")
print(run.start({"a": 1}), flush=True)
run.log({"loss": 1.0}, 1)
raise RuntimeError("the training crashed")
"""


def test_a_crashed_stage_leaves_a_failed_run_not_a_running_one(store):
    p = subprocess.run([sys.executable, "-c", CRASH, str(store)], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 1 and "the training crashed" in p.stderr
    run = client(store).get_run(p.stdout.split()[-1])
    assert run.info.status == "FAILED" and run.data.metrics == {"loss": 1.0}


def test_attach_without_a_training_run_creates_one(store):
    r = LiveRun.attach(store, "attach", "random")
    assert r.run_id is not None
    r.log({"top1": 10.0})
    r.end()
    info = client(store).get_run(r.run_id).info
    assert info.status == "FINISHED" and info.start_time <= info.end_time
    assert LiveRun.attach(store, "attach", "random").run_id == r.run_id


def test_dvc_experiment_has_its_own_run(store, monkeypatch):
    c = client(store)
    ws = LiveRun(store, "dvcexp", "sela")
    ws_id = ws.start({"k": 10})
    ws.end()
    monkeypatch.setenv("DVC_EXP_NAME", "k12")
    ex = LiveRun(store, "dvcexp", "sela")
    ex_id = ex.start({"k": 12}, resume=True)  # resume finds no run of k12: a new one
    ex.end()
    assert ex_id != ws_id and c.get_run(ex_id).data.tags["dvc_experiment"] == "k12"
    assert LiveRun.attach(store, "dvcexp", "sela").run_id == ex_id
    monkeypatch.delenv("DVC_EXP_NAME")
    assert LiveRun.attach(store, "dvcexp", "sela").run_id == ws_id
    assert "dvc_experiment" not in c.get_run(ws_id).data.tags


def test_experiment_opens_on_the_runs_table(store):
    c = client(store)
    LiveRun(store, "kind", "moco").start({})
    assert c.get_experiment_by_name("kind").tags["mlflow.experimentKind"] == "custom_model_development"
    # an experiment made before (without the tag) gets it; a kind someone chose stays
    old = c.create_experiment("kind-old")
    LiveRun.attach(store, "kind-old", "moco").end()
    assert c.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    genai = c.create_experiment("kind-genai", tags={"mlflow.experimentKind": "genai_development"})
    LiveRun.attach(store, "kind-genai", "moco").end()
    assert c.get_experiment(genai).tags["mlflow.experimentKind"] == "genai_development"


def test_disabled_run_does_nothing(tmp_path):
    r = LiveRun(tmp_path, "off", "moco", enabled=False)
    assert r.start({"a": 1}, DIGITS) is None
    r.log({"a": 1.0}, 1)
    r.end()
    assert LiveRun.attach(tmp_path, "off", "moco", enabled=False).run_id is None
    assert not (tmp_path / "mlflow.db").exists()


def test_dead_server_costs_seconds_and_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    caplog.set_level(logging.WARNING)
    run = LiveRun(tmp_path, "x", "moco")
    t0 = time.perf_counter()
    assert run.start({"a": 1}, DIGITS) is None
    run.log({"loss": 1.0}, 1)
    run.log({"loss": 0.5}, 2)
    run.end()
    later = LiveRun.attach(tmp_path, "x", "moco")  # the next call of the stage: off at once
    later.log({"top1": 1.0})
    later.end()
    assert time.perf_counter() - t0 < tracking.BUDGET_S + 0.5
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "MLflow logging failed" in warnings[0].getMessage()
    assert later.run_id is None and not run.active


def test_hung_server_is_cut_at_the_budget(tmp_path, monkeypatch, caplog):
    """A server that accepts and never answers: the calls wait no longer than the budget."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{srv.getsockname()[1]}")
    tracking.reset(budget_s=1.0)
    caplog.set_level(logging.WARNING)
    try:
        t0 = time.perf_counter()
        run = LiveRun(tmp_path, "x", "moco")
        assert run.start({"a": 1}) is None
        run.log({"loss": 1.0}, 1)
        run.end()
        assert time.perf_counter() - t0 < 1.0 + 0.5
    finally:
        srv.close()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "budget" in warnings[0].getMessage()


def test_slow_calls_share_one_budget(store, monkeypatch, caplog):
    """Calls that succeed, slowly: together they wait no longer than the budget."""
    from mlflow.tracking import MlflowClient

    LiveRun(store, "slow", "warm").start({})  # the store is open before the clock starts
    tracking.reset(budget_s=1.0)
    real = MlflowClient.set_terminated

    def slow_set_terminated(self, *a, **k):
        time.sleep(0.4)
        return real(self, *a, **k)

    monkeypatch.setattr(MlflowClient, "set_terminated", slow_set_terminated)
    caplog.set_level(logging.WARNING)
    t0 = time.perf_counter()
    done = []
    for m in ("a", "b", "c", "d"):
        r = LiveRun(store, "slow", m)
        r.start({"m": m})
        r.end()
        done.append(r.run_id is not None)
    assert time.perf_counter() - t0 < 1.0 + 0.5
    assert done[0] and not done[-1]  # the first ran; by the last the budget was spent
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "budget" in warnings[0].getMessage()

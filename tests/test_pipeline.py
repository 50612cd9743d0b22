"""End to end: `dvc repro` of a tiny config in a temporary copy of the repository, on generated
folders of JPEGs of different sizes (no image_size: the files are streamed).

Checks that every declared output is written, that a second `dvc repro` runs nothing, that adding
a method leaves the other methods' stages up to date, that `dvc exp run -S deepcluster.k=...`
retrains only DeepCluster and MLCD (the other methods' results reused) and the report and shows up in `dvc exp show`, that MLflow
holds one run per method, live from training (params, the dataset input, per-step and per-epoch
curves, real start and end times) with the evaluation numbers added by the report; and that an
unlabelled training folder runs the whole DAG, the label-based evaluations skipping with a message.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from selfsup.dag import stages_of
from selfsup.data.synthetic import make_image_folder

METHODS = ["deepcluster", "random", "supervised", "mlcd"]
PRETRAIN = {f"pretrain-{m}" for m in METHODS}
UPSTREAM = {"mlcd": "data/models/deepcluster.pt"}  # MLCD clusters DeepCluster's encoder (a DVC dep)
TABLE1 = ["parametric", "nce10"]  # InstDisc's Table 1 sweep, two rows of one epoch


def run(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r.stdout + r.stderr


def stages_run(out):
    return set(re.findall(r"Running stage '([^']+)'", out))


def make_repo(dst, folder, methods, upstream, table1_rows, workers, eval_defaults=False, table1_run="auto"):
    """A git + DVC repository at ``dst`` running ``methods`` on ``folder``, after its first `dvc repro`.
    ``eval_defaults``: the evaluation keys (whiten, cluster, linear) as params.yaml ships them."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if not src.is_file() or f.split("/")[0] in ("metrics", "plots", "reports") or f.endswith("dvc.lock"):
            continue  # generated: the test must see them written
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / f)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["methods"] = {m: upstream.get(m, "data/dataset") for m in methods}
    params.update(device="cpu", workers=workers, log_every=2)
    # JPEGs of 16-40 px, no image_size: train crops of the originals resized to 16, eval resize 20 + crop 16
    params["dataset"].update(name="imagefolder", path=str(folder), crop_size=16, resize_size=20)
    params["deepcluster"].update(epochs=2, k=10, pca_dim=16)
    params["supervised"].update(epochs=1)
    params["mlcd"].update(epochs=1, centres=20)
    if not eval_defaults:
        params["linear"].update(epochs=5)
        params["whiten"]["pca_dim"] = 8
        params["cluster"]["nredo"] = 1
    params["voc"].update(steps=10, warmup_steps=2, lr_steps=[8])
    params["voc"]["embedded"].update(trainval_images=16, test_images=8)
    params["instdisc_table1"].update(epochs=1, rows={r: TABLE1_ROWS[r] for r in table1_rows}, run=table1_run)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    from selfsup.dag import main as dag

    assert dag(["--root", str(dst)]) == 0  # the pretrain stage and method lists for these methods
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` = this venv
    env["DVC_NO_ANALYTICS"] = "1"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    run(["git", "init", "-q"], dst, env)
    run([*git, "add", "-A"], dst, env)
    run([*git, "commit", "-qm", "tiny"], dst, env)
    dvc = [sys.executable, "-m", "dvc"]
    first = run([*dvc, "repro"], dst, env)
    run([*git, "add", "-A"], dst, env)
    run([*git, "commit", "-qm", "repro"], dst, env)
    return {"dir": dst, "env": env, "dvc": dvc, "first": first}


TABLE1_ROWS = {"parametric": {"softmax": "parametric", "nce_m": 0}, "nce10": {"softmax": "nonparametric", "nce_m": 10}}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    folder = make_image_folder(base / "images", 240, 60, classes=3, size=(16, 40), seed=1)
    # InstDisc's Table 1 without InstDisc among the methods: asked for (instdisc_table1.run: always)
    return make_repo(base / "repo", folder, METHODS, UPSTREAM, TABLE1, workers=-1, table1_run="always")


def test_repro_writes_every_declared_output(repo):
    d = repo["dir"]
    expected = {"check", "download", *PRETRAIN, "voc_data", "evaluate", "voc", "report", "table1"}
    assert stages_run(repo["first"]) == expected
    declared = []
    for body in stages_of(d).values():
        for key in ("outs", "metrics", "plots"):
            for o in body.get(key, []):
                declared.append(next(iter(o)) if isinstance(o, dict) else o)
    assert len(declared) >= 30
    for p in declared:
        assert (d / p).exists(), p
    assert set(yaml.safe_load((d / "dvc.lock").read_text())["stages"]) == expected
    assert "pretrain mlcd: 1 epochs" in repo["first"] and "pretrain: 1 methods" in repo["first"]
    md = (d / "reports" / "results.md").read_text()
    for m in METHODS:
        assert f"| {m} |" in md
    assert (d / "reports" / "plots" / "loss.png").stat().st_size > 1000
    assert "voc_ap50" in md and "| method | digit0 |" in (d / "reports" / "voc.md").read_text()
    voc = json.loads((d / "metrics" / "voc" / "supervised.json").read_text())
    assert 0 <= voc["map50"] <= 100 and voc["steps"] == 10
    assert "| nce10 | NCE m = 10 |" in (d / "reports" / "instdisc_table1.md").read_text()
    knn = json.loads((d / "metrics" / "knn" / "deepcluster.json").read_text())
    assert 0 < knn["k200_top1"] <= 100 and knn["k200_k_used"] == 200


def test_second_repro_runs_nothing(repo):
    out = run([*repo["dvc"], "repro"], repo["dir"], repo["env"])
    assert stages_run(out) == set(), out
    status = run([*repo["dvc"], "status", "--json"], repo["dir"], repo["env"])
    assert json.loads(status) == {}


def test_status_names_the_changed_method_and_a_target_runs_one(repo):
    """`dvc status` after a change to one method's block names that method's training stage (and the
    check of params.yaml) only; `dvc repro -s pretrain-<m>` runs that method's training alone."""
    d, env, dvc = repo["dir"], repo["env"], repo["dvc"]
    params_before = (d / "params.yaml").read_text()
    try:
        params = yaml.safe_load(params_before)
        params["deepcluster"]["k"] = params["deepcluster"].get("k", 10) + 1
        (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        status = json.loads(run([*dvc, "status", "--json"], d, env))
        assert set(status) == {"check", "pretrain-deepcluster"}, status
    finally:
        (d / "params.yaml").write_text(params_before)
    out = run([*dvc, "repro", "-f", "-s", "pretrain-supervised"], d, env)
    assert stages_run(out) == {"pretrain-supervised"}, out
    assert re.search(r"pretrain supervised: .*reused", out) and "pretrain random" not in out, out
    assert json.loads(run([*dvc, "status", "--json"], d, env)) == {}  # its outputs rewritten byte for byte


def test_adding_a_method_leaves_the_others_up_to_date(repo):
    """A new method = its file + a params block + a methods entry (+ `python -m selfsup.dag`):
    `dvc status` then lists the stages that loop over the methods (each reuses the other methods'
    results: test_exp_run_...) and the report."""
    d = repo["dir"]
    src = (d / "selfsup" / "methods" / "supervised.py").read_text()
    new = d / "selfsup" / "methods" / "supervised2.py"
    params_before = (d / "params.yaml").read_text()
    try:
        new.write_text(src.replace('name = "supervised"', 'name = "supervised2"'))
        params = yaml.safe_load(params_before)
        params["methods"]["supervised2"] = "data/dataset"
        params["supervised2"] = {"epochs": 1}
        (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run([sys.executable, "-m", "selfsup.dag"], d, repo["env"])
        status = json.loads(run([*repo["dvc"], "status", "--json"], d, repo["env"]))
        # the stages whose params and outputs follow the method list, and the check of params.yaml (a new
        # block, a new method file); the tables of InstDisc and the data stages are untouched
        assert set(status) == {"check", "pretrain-supervised2", "evaluate", "voc", "report"}, sorted(status)
    finally:
        new.unlink(missing_ok=True)
        (d / "params.yaml").write_text(params_before)
        run([sys.executable, "-m", "selfsup.dag"], d, repo["env"])
    assert json.loads(run([*repo["dvc"], "status", "--json"], d, repo["env"])) == {}


def test_a_clone_that_pulls_runs_nothing(repo, tmp_path):
    """`dvc push` to a local-directory remote, then a fresh `git clone` that `dvc pull`s: its `dvc repro`
    trains and evaluates nothing (the per-method stores are cached outputs, pulled with the models);
    only the check stage, whose constant output is not cached, runs."""
    d, env, dvc = repo["dir"], repo["env"], repo["dvc"]
    remote = tmp_path / "remote"
    run([*dvc, "remote", "add", "--local", "-f", "shared", str(remote)], d, env)
    run([*dvc, "push", "-r", "shared"], d, env)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(d), str(clone)], tmp_path, env)
    run([*dvc, "remote", "add", "--local", "shared", str(remote)], clone, env)
    run([*dvc, "pull", "-r", "shared"], clone, env)
    out = run([*dvc, "repro"], clone, env)
    assert stages_run(out) <= {"check"}, out[-3000:]
    assert json.loads(run([*dvc, "status", "--json"], clone, env)) == {}


def test_exp_run_retrains_only_deepcluster_and_mlcd(repo):
    """In a temporary copy (`--temp`: the executor `dvc exp run --queue` uses too), which DVC fills by
    checking out the cached outputs, the per-method stores among them."""
    out = run([*repo["dvc"], "exp", "run", "--temp", "-n", "k12", "-S", "deepcluster.k=12"], repo["dir"], repo["env"])
    # DeepCluster retrained, and MLCD, which clusters DeepCluster's encoder; the other two methods' stages
    # are unchanged (DVC runs neither), and their model files let evaluate and voc reuse them
    assert stages_run(out) == {"check", "pretrain-deepcluster", "pretrain-mlcd", "evaluate", "voc", "report"}, out
    for m in ("deepcluster", "mlcd"):
        assert re.search(rf"pretrain {m}: .*trained \d+ batches now", out), out
    for stage in ("evaluate", "voc"):
        assert re.search(rf"{stage} random: .*reused", out) and re.search(rf"{stage} mlcd: .*s\n", out), out
        assert not re.search(rf"{stage} deepcluster: .*reused", out), out
    shown = json.loads(run([*repo["dvc"], "exp", "show", "--json"], repo["dir"], repo["env"]))
    text = json.dumps(shown)
    assert '"k12"' in text
    exps = [e for rev in shown for e in (rev.get("experiments") or []) if e.get("name") == "k12"]
    assert exps, text[:2000]
    data = exps[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["deepcluster"]["k"] == 12
    assert "top1" in data["metrics"]["metrics/knn/deepcluster.json"]["data"]


def test_mlflow_has_one_run_per_method(repo):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{repo['dir'] / 'mlflow.db'}")
    exp = c.get_experiment_by_name("selfsup")
    runs = c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    first = [r for r in runs if "dvc_experiment" not in r.data.tags]
    assert sorted(r.data.tags["method"] for r in first[:len(METHODS)]) == sorted(METHODS)
    dc = next(r for r in first if r.data.tags["method"] == "deepcluster")
    assert dc.data.params["method.k"] == "10" and dc.data.params["dataset.name"] == "imagefolder"
    assert {"knn200_top1", "linear_top1", "nmi", "pretrain_seconds", "voc_ap50", "voc.ap75"} <= set(dc.data.metrics)
    assert [m.step for m in c.get_metric_history(dc.info.run_id, "epoch/loss")] == [1, 2]
    # live from training: per-step curves (log_every 2), the dataset as an input, a real duration
    steps = [m.step for m in c.get_metric_history(dc.info.run_id, "step/loss")]
    assert steps and steps == sorted(steps) and steps[0] == 2
    assert [d.dataset.name for d in dc.inputs.dataset_inputs] == ["imagefolder"]
    pretrain_s = json.loads((repo["dir"] / "metrics" / "pretrain" / "deepcluster.json").read_text())["seconds"]
    assert (dc.info.end_time - dc.info.start_time) / 1000 >= pretrain_s
    assert c.get_experiment(exp.experiment_id).tags.get("mlflow.experimentKind") == "custom_model_development"
    assert len(dc.data.tags["git_commit"]) == 40
    arts = {a.path for a in c.list_artifacts(dc.info.run_id)}
    assert {"results.md", "results.csv", "voc.md", "plots"} <= arts
    exp_runs = [r for r in runs if r.data.tags.get("dvc_experiment") == "k12"]
    if exp_runs:  # present when the exp test ran first in this session
        assert sorted(r.data.tags["method"] for r in exp_runs) == sorted(METHODS)
        dc12 = next(r for r in exp_runs if r.data.tags["method"] == "deepcluster")
        assert dc12.data.params["method.k"] == "12"


def fingerprint(d):
    """md5 of every file a finished run wrote (the dataset, models, metrics, plots, reports)."""
    import hashlib

    out = {}
    for top in ("data/dataset", "data/models", "data/pretrain", "data/features", "metrics", "plots", "reports"):
        for f in sorted((d / top).rglob("*")):
            if f.is_file():
                out[str(f.relative_to(d))] = hashlib.md5(f.read_bytes()).hexdigest()
    return out


def edit_params(d, fn):
    params = yaml.safe_load((d / "params.yaml").read_text())
    fn(params)
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def fails(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode != 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


BAD_PARAMS = [
    (lambda p: p["deepcluster"].update(k=-5), "params: deepcluster.k: must be > 0, got -5"),
    (lambda p: p["dataset"].update(path="/nowhere/images"), "params: dataset.path: /nowhere/images does not exist"),
    (lambda p: p.update(device="cuda:7"), "params: device: 'cuda:7'"),
    # a misspelt key that no stage reads: only the check stage, which reads the whole file, sees it
    (lambda p: p.update(checkpoint_minute=5), "params: checkpoint_minute: unknown key; did you mean 'checkpoint_minutes'?"),
]


def test_a_bad_param_fails_before_dvc_deletes_anything(repo):
    """A bad value fails in the check stage, the first of the DAG, as one line: DVC removed no output of
    a finished run (every file's md5 unchanged); fixed, the check re-runs alone."""
    d, env, dvc = repo["dir"], repo["env"], repo["dvc"]
    text = (d / "params.yaml").read_text()
    before = fingerprint(d)
    assert len(before) > 30
    try:
        for edit, message in BAD_PARAMS:
            edit_params(d, edit)
            out = fails([*dvc, "repro"], d, env)
            assert message in out and "Traceback" not in out, out[-3000:]
            assert stages_run(out) == {"check"}, out[-3000:]
            assert fingerprint(d) == before, message
            (d / "params.yaml").write_text(text)
    finally:
        (d / "params.yaml").write_text(text)
    out = run([*dvc, "repro"], d, env)
    assert stages_run(out) == {"check"}, out
    assert json.loads(run([*dvc, "status", "--json"], d, env)) == {}
    assert fingerprint(d) == before


def test_a_sweep_writes_yaml_12_numbers_that_parse(repo):
    """`dvc exp run -S key=1e-6` writes YAML 1.2's `1e-06` into params.yaml; the config reads it as a number
    (checkpoint_minutes: a float key that only the check stage tracks, so nothing else re-runs)."""
    d, env, dvc = repo["dir"], repo["env"], repo["dvc"]
    before = {f: (d / f).read_text() for f in ("params.yaml", "dvc.lock")}
    try:
        out = run([*dvc, "exp", "run", "-n", "tiny-float", "-S", "checkpoint_minutes=1e-6"], d, env)
        assert stages_run(out) == {"check"}, out
        assert "checkpoint_minutes: 1e-06" in (d / "params.yaml").read_text()
    finally:
        for f, text in before.items():
            (d / f).write_text(text)
    assert json.loads(run([*dvc, "status", "--json"], d, env)) == {}


def test_a_copied_tree_reuses_every_voc_result(repo, tmp_path):
    """The detection results are keyed on the data's content, not its mtimes: a copy that drops them (here
    every file of the repository) re-running the voc stage reuses every method's result."""
    import shutil

    d, env, dvc = repo["dir"], repo["env"], repo["dvc"]
    copy = tmp_path / "copy"
    shutil.copytree(d, copy, copy_function=shutil.copy, symlinks=True)  # shutil.copy: new mtimes
    f = next((copy / "data" / "voc").rglob("*.jpg"))
    assert f.stat().st_mtime_ns != (d / f.relative_to(copy)).stat().st_mtime_ns
    out = run([*dvc, "repro", "-f", "-s", "voc"], copy, env)
    for m in METHODS:
        assert re.search(rf"voc {m}: .*reused", out), out[-3000:]


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    """Train and test folders of images without class folders (real photos), no InstDisc: the evaluation
    keys as shipped."""
    base = tmp_path_factory.mktemp("e2e_unl")
    folder = make_image_folder(base / "images", 90, 30, classes=3, size=(16, 40), seed=2, labelled=False)
    for f in list((folder / "test").rglob("*.jpg")):  # the test split unlabelled too
        f.rename(folder / "test" / f"{f.parent.name}_{f.name}")
    for c in [p for p in (folder / "test").iterdir() if p.is_dir()]:
        c.rmdir()
    return make_repo(base / "repo", folder, ["deepcluster", "supervised", "random"], {}, ["nce10"], workers=0,
                     eval_defaults=True)


def test_unlabelled_folder_runs_the_whole_dag(unlabelled):
    d = unlabelled["dir"]
    methods = ["deepcluster", "supervised", "random"]
    expected = {"check", "download", *(f"pretrain-{m}" for m in methods), "voc_data", "evaluate", "voc", "report",
                "table1"}
    assert stages_run(unlabelled["first"]) == expected
    meta = json.loads((d / "data" / "dataset" / "meta.json").read_text())
    assert meta["format"] == "files" and meta["classes"] == []
    assert meta["counts"]["train_unlabeled"] == 90 and meta["counts"]["test_unlabeled"] == 30
    for m in methods:
        for stage in ("knn", "linear", "cluster", "finetune"):
            out = json.loads((d / "metrics" / stage / f"{m}.json").read_text())
            assert "no labels" in out["skipped"], (stage, m, out)
        if m == "supervised":  # it did not train (no labels): no evaluation and no detector, each says why
            assert "training split has no labels" in out["skipped"]
            voc = json.loads((d / "metrics" / "voc" / f"{m}.json").read_text())
            assert "training split has no labels" in voc["skipped"] and "map50" not in voc
            assert re.search(r"voc supervised: supervised: skipped", unlabelled["first"])
            continue
        cluster = json.loads((d / "metrics" / "cluster" / f"{m}.json").read_text())
        assert cluster["k"] == 10 and cluster["objective"] > 0  # cluster.k 0 without classes: 10
        assert "probes" not in json.loads((d / "metrics" / "linear" / f"{m}.json").read_text())  # no work
        voc = json.loads((d / "metrics" / "voc" / f"{m}.json").read_text())
        assert 0 <= voc["map50"] <= 100  # VOC has its own labels
        # one line per method says what skips
        assert len(re.findall(rf"evaluate {m}: the label-based evaluations", unlabelled["first"])) == 1
    sup = json.loads((d / "metrics" / "pretrain" / "supervised.json").read_text())
    assert "no labels" in sup["skipped"] and sup["epochs"] == 0
    assert json.loads((d / "metrics" / "pretrain" / "deepcluster.json").read_text())["epochs"] == 2
    assert "| deepcluster |" in (d / "reports" / "results.md").read_text()
    # InstDisc is not among the methods: its Table 1 trains no row, and the page says why
    assert not (d / "data" / "table1" / "nce10").exists()
    assert "Not run: instdisc_table1.run is auto and instdisc is not among methods" in \
        (d / "reports" / "instdisc_table1.md").read_text()
    assert not list((d / "metrics").glob("table1/*.json"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 3-class folder of 48 JPEGs of varying size (30 train: fewer than whiten.pca_dim's 32 axes), the
    evaluation keys as shipped."""
    base = tmp_path_factory.mktemp("e2e_small")
    folder = make_image_folder(base / "images", 30, 18, classes=3, size=(16, 40), seed=3)
    return make_repo(base / "repo", folder, ["random", "supervised"], {}, [], workers=0, eval_defaults=True)


def test_a_small_folder_runs_with_the_default_evaluation(small):
    d = small["dir"]
    assert {"check", "download", "pretrain-random", "pretrain-supervised", "evaluate", "voc", "report"} <= \
        stages_run(small["first"])
    assert "whiten.pca_dim: 32 is more than 30 samples of dimension 128 can span; using 29" in small["first"]
    for m in ("random", "supervised"):
        cluster = json.loads((d / "metrics" / "cluster" / f"{m}.json").read_text())
        assert cluster["pca_dim"] <= 29 and cluster["k"] == 3 and 0 <= cluster["nmi"] <= 1
        assert 0 <= json.loads((d / "metrics" / "knn" / f"{m}.json").read_text())["top1"] <= 100
        assert 0 <= json.loads((d / "metrics" / "linear" / f"{m}.json").read_text())["top1"] <= 100

"""Repository promises: CI runs README's test command; every stage script and method is wired."""
import re

import yaml

from conftest import ROOT
from selfsup.core.config import load_config
from selfsup.methods import REGISTRY


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    test_cmd = next(b.strip() for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    ci_line = next(line for line in ci.splitlines() if "pytest" in line)
    # .ci/run may quieten pip; otherwise it is the README command verbatim
    assert ci_line == test_cmd, (ci_line, test_cmd)


def test_dvc_stages_match_scripts_and_params():
    from selfsup.dag import stages_of

    dvc = stages_of(ROOT)
    cfg = load_config(ROOT / "params.yaml")
    for name, stage in dvc.items():
        body = stage.get("do", stage)
        script = f"stages/{name.split('-')[0]}.py"  # pretrain-<m>: stages/pretrain.py <m>
        assert body["cmd"].split()[1] == script
        assert script in body["deps"]
        for p in body.get("params", []):
            if isinstance(p, dict):  # a params file read whole: the check stage, the first one
                assert p == {"params.yaml": None} and name == "check", (name, p)
                continue
            top = p.split(".")[0]
            assert top == "${key}" or hasattr(cfg, top) or top in cfg.method_cfgs, p
    # every other stage runs after the check of params.yaml (its output is their dependency)
    assert list(dvc)[0] == "check" and all("data/params.checked" in s.get("deps", []) for n, s in dvc.items()
                                           if n != "check")
    for m in cfg.methods:
        assert m in REGISTRY and (ROOT / "selfsup" / "methods" / f"{m}.py").is_file()
    # one pretrain stage per method: its params block and upstream key, its own method file only, its
    # checkpoint folder, model and metrics
    assert [n for n in dvc if n.startswith("pretrain")] == [f"pretrain-{m}" for m in cfg.methods]
    for m in cfg.methods:
        pre = dvc[f"pretrain-{m}"]
        assert pre["cmd"] == f"python stages/pretrain.py {m}"
        assert {m, f"methods.{m}"} <= set(pre["params"]) and not set(cfg.methods) - {m} & set(pre["params"])
        # its own method file, and another only where its class builds on that one's (random_vit on
        # random's, relloc on jigsaw's patch cutting)
        own = [d for d in pre["deps"] if d.startswith("selfsup/methods/") and d != "selfsup/methods/__init__.py"]
        assert f"selfsup/methods/{m}.py" in own and len(own) <= 2, (m, own)
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in pre["outs"]]
        assert outs == [f"data/pretrain/{m}", f"data/models/{m}.pt"]
        assert [next(iter(o)) for o in pre["metrics"]] == [f"metrics/pretrain/{m}.json"]
    assert "data/models/deepcluster.pt" in dvc["pretrain-mlcd"]["deps"]  # DVC trains DeepCluster first
    assert not (ROOT / "pipelines").exists()


def test_dag_files_are_generated():
    """Every stage's code deps equal its import closure, and the pretrain stage's the union of the
    methods' closures: `python -m selfsup.dag` writes them."""
    from selfsup.dag import changed, methods_of, rows_of, voc_of

    stale = changed(ROOT, methods_of(ROOT / "params.yaml"), rows_of(ROOT / "params.yaml"), voc_of(ROOT / "params.yaml"))
    assert not stale, f"stale: {sorted(map(str, stale))}: run python -m selfsup.dag"


def test_the_lock_holds_no_stale_stage():
    """A lock entry DVC no longer needs is never pruned by DVC: the lock holds exactly the stages of
    dvc.yaml (a stale entry is re-parsed and rewritten after every stage)."""
    from selfsup.dag import stages_of

    lock = ROOT / "dvc.lock"
    assert set(yaml.safe_load(lock.read_text())["stages"]) == set(stages_of(ROOT)), lock
    assert "pretrain-moco" in stages_of(ROOT)


def test_a_training_depends_only_on_its_own_method():
    """The point of per-method closures: the code in a method's checkpoint key (selfsup.engine.loop.run_key)
    is its own, so editing SeLa's Sinkhorn retrains SeLa and not MoCo, and no method's key covers
    another method's file."""
    from selfsup.core.codedeps import closure

    moco, sela = set(closure("selfsup/engine/loop.py", "moco")), set(closure("selfsup/engine/loop.py", "sela"))
    assert "selfsup/cluster/sinkhorn.py" in sela and "selfsup/cluster/sinkhorn.py" not in moco
    assert "selfsup/models/momentum.py" in moco and "selfsup/models/momentum.py" not in sela
    assert not {f for f in moco if f.startswith("selfsup/methods/")} - {
        "selfsup/methods/__init__.py", "selfsup/engine/contract.py", "selfsup/methods/moco.py"}
    # the config parser imports no method: the evaluation stage depends on no method's code (the
    # contract only: MoCo's augmented probe runs the training loop's loader)
    assert {f for f in closure("stages/evaluate.py") if f.startswith("selfsup/methods/")} <= {
        "selfsup/methods/__init__.py", "selfsup/engine/contract.py"}


def test_the_registry_is_lazy():
    """Importing the registry imports no method module (a subprocess: this one already has some)."""
    import subprocess
    import sys

    code = ("import sys; import selfsup.core.config, selfsup.methods as m; "
            "print(sorted(k for k in sys.modules if k.startswith('selfsup.methods.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_dag_prunes_the_lock_entries_of_removed_stages(tmp_path):
    """DVC keeps a removed stage's lock entry for ever: `python -m selfsup.dag` drops it (--check
    fails on it), keeping the entries of the stages dvc.yaml has."""
    import shutil

    from selfsup.dag import main as dag

    for f in ("dvc.yaml", "params.yaml", "dvc.lock"):
        shutil.copy(ROOT / f, tmp_path / f)
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())
    kept = set(lock["stages"])
    lock["stages"]["table1@gone"] = {"cmd": "python stages/table1.py gone"}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    assert dag(["--root", str(tmp_path), "--check"]) == 1
    assert dag(["--root", str(tmp_path)]) == 0
    assert set(yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]) == kept
    assert dag(["--root", str(tmp_path), "--check"]) == 0

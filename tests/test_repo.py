"""Repository promises: CI runs README's test command; every stage script and method is wired."""
import re

import yaml

from conftest import ROOT
from selfsup.config import load_config
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
    from selfsup.dag import branch, stages_of

    dvc = stages_of(ROOT)
    cfg = load_config(ROOT / "params.yaml")
    for name, stage in dvc.items():
        body = stage.get("do", stage)
        script = f"stages/{name.split(':')[-1]}.py"
        assert body["cmd"].split()[1] == script
        assert script in body["deps"]
        for p in body.get("params", []):
            top = p.split(".")[0]
            assert top == "${key}" or hasattr(cfg, top) or top in cfg.method_cfgs, p
    for m in cfg.methods:
        assert m in REGISTRY and (ROOT / "selfsup" / "methods" / f"{m}.py").is_file()
    # one branch (pretrain, evaluate, voc) per method and no other method file
    assert {n for n in dvc if ":" in n} == branch(cfg.methods)


def test_dag_files_are_generated():
    """Every stage's code deps equal its import closure, and each method has its pipelines/<m>/dvc.yaml
    with its pretraining's closure: `python -m selfsup.dag` writes them."""
    from selfsup.dag import changed, methods_of

    stale = changed(ROOT, methods_of(ROOT / "params.yaml"))
    assert not stale, f"stale: {sorted(map(str, stale))}: run python -m selfsup.dag"


def test_each_method_file_has_its_own_lock_and_the_root_lock_no_stale_stage():
    """A lock entry DVC no longer needs is never pruned by DVC: the lock files hold exactly the stages
    their dvc.yaml has (a stale entry is re-parsed and rewritten after every stage)."""
    from selfsup.dag import stages_of

    def expanded(f):
        cfg = load_config(ROOT / "params.yaml")
        out = set()
        for name, body in (yaml.safe_load(f.read_text()) or {})["stages"].items():
            out |= {f"{name}@{k}" for k in cfg.instdisc_table1.rows} if "foreach" in body else {name}
        return out

    files = [ROOT / "dvc.yaml", *sorted((ROOT / "pipelines").glob("*/dvc.yaml"))]
    assert len(files) == len(load_config(ROOT / "params.yaml").methods) + 1
    for f in files:
        lock = f.parent / "dvc.lock"
        assert lock.is_file(), lock
        assert set(yaml.safe_load(lock.read_text())["stages"]) == expanded(f), lock
    assert stages_of(ROOT)


def test_a_stage_depends_only_on_its_own_method():
    """The point of deriving deps: SeLa's Sinkhorn is not a dependency of MoCo's training, and no
    method's stage lists another method's file."""
    from selfsup.codedeps import closure

    moco, sela = set(closure("stages/pretrain.py", "moco")), set(closure("stages/pretrain.py", "sela"))
    assert "selfsup/sinkhorn.py" in sela and "selfsup/sinkhorn.py" not in moco
    assert "selfsup/momentum.py" in moco and "selfsup/momentum.py" not in sela
    assert not {f for f in moco if f.startswith("selfsup/methods/")} - {
        "selfsup/methods/__init__.py", "selfsup/methods/base.py", "selfsup/methods/moco.py"}
    # the config parser imports no method: the evaluation stage depends on no method's code (the
    # contract only: MoCo's augmented probe runs the training loop's loader)
    assert {f for f in closure("stages/evaluate.py") if f.startswith("selfsup/methods/")} <= {
        "selfsup/methods/__init__.py", "selfsup/methods/base.py"}


def test_the_registry_is_lazy():
    """Importing the registry imports no method module (a subprocess: this one already has some)."""
    import subprocess
    import sys

    code = ("import sys; import selfsup.config, selfsup.methods as m; "
            "print(sorted(k for k in sys.modules if k.startswith('selfsup.methods.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['selfsup.methods.base']"

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
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    cfg = load_config(ROOT / "params.yaml")
    for name, stage in dvc.items():
        body = stage.get("do", stage)
        script = "stages/pretrain.py" if name.startswith("pretrain-") else f"stages/{name}.py"
        assert body["cmd"].split()[1] == script
        assert script in body["deps"]
        for p in body.get("params", []):
            top = p.split(".")[0]
            assert top == "${key}" or hasattr(cfg, top) or top in cfg.method_cfgs, p
    for m in cfg.methods:
        assert m in REGISTRY and (ROOT / "selfsup" / "methods" / f"{m}.py").is_file()
        assert f"pretrain-{m}" in dvc


def test_dvc_yaml_is_generated():
    """Every stage's code deps equal its import closure, and there is one pretraining stage per
    method with that method's closure: `python -m selfsup.dag` writes them."""
    from selfsup.dag import generate, methods_of

    text = (ROOT / "dvc.yaml").read_text()
    assert generate(text, methods_of(ROOT / "params.yaml")) == text, "dvc.yaml is stale: run python -m selfsup.dag"


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

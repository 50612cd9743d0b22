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
        assert body["cmd"].split()[1] == f"stages/{name}.py"
        assert f"stages/{name}.py" in body["deps"]
        for p in body.get("params", []):
            top = p.split(".")[0]
            assert top == "${key}" or hasattr(cfg, top) or top in cfg.method_cfgs, p
    for m in cfg.methods:
        assert m in REGISTRY and (ROOT / "selfsup" / "methods" / f"{m}.py").is_file()

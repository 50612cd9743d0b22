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


def _selfsup_imports(path):
    """selfsup modules a file imports (any import statement, also inside functions)."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("selfsup"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("selfsup"))
    files = set()
    for mod in out:
        rel = mod.replace(".", "/")
        for cand in (ROOT / f"{rel}.py", ROOT / rel / "__init__.py"):
            if cand.is_file():
                files.add(cand.relative_to(ROOT).as_posix())
    return files


def _closure(start, method):
    """Package files a stage script reaches. The method registry is followed only into
    ``methods/base.py`` and the stage's own method file (``selfsup/methods/${key}.py``):
    a method's stages must not depend on the other methods' code. config.py's late
    import of the registry is not followed (it only parses params blocks)."""
    seen, todo = set(), [start]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for g in _selfsup_imports(ROOT / f):
            if f == "selfsup/config.py" and g.startswith("selfsup/methods"):
                continue
            if g.startswith("selfsup/methods/") and g not in (
                "selfsup/methods/__init__.py", "selfsup/methods/base.py", f"selfsup/methods/{method}.py"
            ):
                continue
            todo.append(g)
    return seen


STAGE_METHOD = {"table1": "instdisc"}  # stages outside the methods foreach that train one method


def test_stage_deps_list_the_package_code_they_run():
    """Each stage's deps name every package file its script imports (transitively), so
    editing code re-runs exactly the stages that use it."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    cfg = load_config(ROOT / "params.yaml")
    for name, stage in dvc.items():
        body = stage.get("do", stage)
        per_method = stage.get("foreach") == "${methods}"
        for m in (cfg.methods if per_method else [STAGE_METHOD.get(name)]):
            deps = {d.replace("${key}", m) if per_method else d for d in body["deps"]}
            reached = _closure(f"stages/{name}.py", m)
            if m and "selfsup/methods/__init__.py" in reached:
                reached |= {f"selfsup/methods/{m}.py"}
            missing = sorted(f for f in reached if f.startswith("selfsup/") and f not in deps)
            assert not missing, f"dvc.yaml {name}{'@' + m if m else ''}: deps lack {missing}"

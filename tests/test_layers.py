"""The import rule of ``selfsup/__init__.py``: a subpackage imports only the layers below it (and
itself); the top-level modules (the commands) may import anything; nothing imports them but each
other. Every import counts, also one inside a function (a lazy import still runs)."""
from __future__ import annotations

import ast
from pathlib import Path

from selfsup import LAYERS

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "selfsup"


def _layer_of(module: str) -> str:
    """``selfsup.<layer>[.x]`` -> its layer; a top-level module -> "" (above every layer)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else ""


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "selfsup":
            if node.module == "selfsup":  # `from selfsup import x`: x is the module (or a name of __init__)
                out += [f"selfsup.{a.name}" for a in node.names]
            else:
                out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "selfsup"]
    return out


def violations(pkg: Path = PKG) -> list[str]:
    bad = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg.parent)
        parts = rel.with_suffix("").parts  # ("selfsup", layer, ...) or ("selfsup", top-level module)
        own = parts[1] if len(parts) > 2 else ""
        if own == "":  # a command (python -m selfsup.<name>): it may import anything
            continue
        for mod in _imports(path):
            target = _layer_of(mod)
            if target == "" and mod != "selfsup" and mod.split(".")[1] not in LAYERS:
                bad.append(f"{rel}: imports the top-level module {mod}")
            elif target and LAYERS.index(target) > LAYERS.index(own):
                bad.append(f"{rel}: layer {own} imports {mod} (layer {target}, above it)")
    return bad


def test_every_layer_imports_only_the_layers_below_it():
    assert violations() == []


def test_the_layout_is_the_documented_one():
    """Every subpackage is a layer, every layer a subpackage; at most 8 modules at the top level."""
    subpackages = sorted(p.parent.name for p in PKG.glob("*/__init__.py"))
    assert subpackages == sorted(LAYERS)
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 8, top
    assert len(LAYERS) >= 6


def test_the_checker_can_fail(tmp_path):
    """A low layer importing a high one, or a layer importing a command, is reported; a command
    importing anything is not."""
    pkg = tmp_path / "selfsup"
    (pkg / "core").mkdir(parents=True)
    (pkg / "core" / "io.py").write_text("from selfsup.eval import knn\nfrom selfsup import dag\n")
    (pkg / "eval").mkdir()
    (pkg / "eval" / "knn.py").write_text("from selfsup.core import io\n")
    (pkg / "dag.py").write_text("from selfsup.report import results\n")
    assert violations(pkg) == ["selfsup/core/io.py: layer core imports selfsup.eval (layer eval, above it)",
                               "selfsup/core/io.py: imports the top-level module selfsup.dag"]

"""Which package files a stage runs: the static import closure of its script.

Every ``import`` / ``from ... import`` statement naming a ``selfsup`` module is followed (also
those inside functions: a lazy import still runs). The method registry is lazy
(``selfsup.methods.REGISTRY`` imports ``selfsup/methods/<name>.py`` by name), so the closure of a
stage that trains method ``m`` adds ``selfsup/methods/m.py`` and what it imports, and nothing of
the other methods.

Used by ``python -m selfsup.dag`` (which writes these lists into ``dvc.yaml``), by the test that
checks ``dvc.yaml`` against them, and by the training checkpoint key (``selfsup.train.run_key``),
so that DVC and resume agree on what "the code changed" means.
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REGISTRY_FILE = "selfsup/methods/__init__.py"


@lru_cache(maxsize=None)
def _imports(rel: str) -> frozenset[str]:
    """Repository-relative files of the selfsup modules ``rel`` imports."""
    mods: set[str] = set()
    for node in ast.walk(ast.parse((ROOT / rel).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "selfsup":
            mods.add(node.module)
            mods.update(f"{node.module}.{a.name}" for a in node.names)  # `from selfsup import x` may be a module
        elif isinstance(node, ast.Import):
            mods.update(a.name for a in node.names if a.name.split(".")[0] == "selfsup")
    files = set()
    for mod in mods:
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):  # a package's __init__ runs on the way to its modules
            base = "/".join(parts[:i])
            for cand in (f"{base}.py", f"{base}/__init__.py"):
                if (ROOT / cand).is_file():
                    files.add(cand)
    return frozenset(files)


def closure(start: str, method: str | None = None) -> list[str]:
    """Sorted repository-relative files ``start`` runs (itself included); with ``method``, the
    registry's lazy import of that method is followed."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(_imports(f))
        if f == REGISTRY_FILE and method is not None:
            todo.append(f"selfsup/methods/{method}.py")
    return sorted(seen)


def code_hash(files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode())
        h.update((ROOT / f).read_bytes())
    return h.hexdigest()[:16]

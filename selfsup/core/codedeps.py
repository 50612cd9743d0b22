"""Which package files a stage runs: the static import closure of its script.

Every ``import`` / ``from ... import`` statement naming a ``selfsup`` module is followed (also
those inside functions: a lazy import still runs). The method registry is lazy
(``selfsup.methods.REGISTRY`` imports ``selfsup/methods/<name>.py`` by name), so the closure of a
stage that trains method ``m`` adds ``selfsup/methods/m.py`` and what it imports, and nothing of
the other methods.

Used by ``python -m selfsup.dag`` (which writes these lists into ``dvc.yaml``), by the test that
checks ``dvc.yaml`` against them, and by the training checkpoint key (``selfsup.engine.loop.run_key``),
so that DVC and resume agree on what "the code changed" means.

``code_hash`` hashes each Python file's syntax tree with its docstrings removed (comments are not
in the tree, and neither are line numbers), so editing a comment or a docstring, or moving code
down a line, keeps every run key and stored result: the stage re-runs under DVC (its dependency
file changed) and reuses every method. Any change a Python parser sees (a name, a constant, an
operator, the order of statements) changes the key. Other files (YAML) are hashed as bytes.
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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
    registry and its lazy import of that method are followed (the engine reaches a method by name,
    ``selfsup.core.config.method_class``, not by an import)."""
    seen: set[str] = set()
    todo = [start, REGISTRY_FILE] if method is not None else [start]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(_imports(f))
        if f == REGISTRY_FILE and method is not None:
            todo.append(f"selfsup/methods/{method}.py")
    return sorted(seen)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """``tree`` without the docstring statement of the module and of each class and function."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@lru_cache(maxsize=1024)
def _py_digest(data: bytes) -> bytes:
    return hashlib.sha256(source_identity(data.decode())).digest()


def source_identity(text: str) -> bytes:
    """What of a Python source counts as code: the dump of its syntax tree without docstrings,
    comments or positions."""
    return ast.dump(_strip_docstrings(ast.parse(text)), include_attributes=False).encode()


def code_hash(files: list[str], root: Path = ROOT) -> str:
    """A short key of ``files`` (repository-relative) under ``root``: Python files by
    ``source_identity``, others by their bytes."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode())
        h.update(b"\0")
        data = (root / f).read_bytes()
        h.update(_py_digest(data) if f.endswith(".py") else data)
        h.update(b"\0")
    return h.hexdigest()[:16]

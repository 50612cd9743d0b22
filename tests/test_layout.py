"""The package stays readable: functions of at most about 80 lines of code, each longer one saying
why in its docstring (``Long because: ...``), and at most three of those."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 80


def long_functions() -> list[tuple[str, str, int, str]]:
    """(file, function, code lines without the docstring, docstring) of every function over LIMIT."""
    out = []
    for path in sorted((ROOT / "selfsup").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node) or ""
            first = node.body[1] if doc and len(node.body) > 1 else node.body[0]
            lines = node.end_lineno - (first.lineno if doc else node.lineno) + 1
            if lines > LIMIT:
                out.append((str(path.relative_to(ROOT)), node.name, lines, doc))
    return out


def test_long_functions_are_few_and_say_why():
    found = long_functions()
    unexplained = [(f, n, k) for f, n, k, doc in found if "Long because:" not in doc]
    assert not unexplained, f"functions over {LIMIT} lines without 'Long because:' in the docstring: {unexplained}"
    assert len(found) <= 3, f"more than three functions over {LIMIT} lines: {[(f, n, k) for f, n, k, _ in found]}"


if __name__ == "__main__":  # python tests/test_layout.py: the list
    for f, n, k, _ in long_functions():
        print(f"{k:4d}  {f}  {n}")


def test_readme_fits_a_screen_and_its_links_resolve():
    import re

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300, "README.md: at most 300 lines; long-form text goes to docs/"
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    assert {"docs/results.md", "docs/presets.md", "docs/dag.md", "docs/methods.md"} <= set(links)
    missing = [t for t in links if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
    for doc in (ROOT / "docs").glob("*.md"):
        assert f"docs/{doc.name}" in links, f"docs/{doc.name} is not linked from README.md"

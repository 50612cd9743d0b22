"""Run keys follow the code, not its comments: ``selfsup.core.codedeps.code_hash`` on syntax trees."""
from __future__ import annotations

import shutil
from pathlib import Path

from selfsup.core.codedeps import ROOT, closure, code_hash, source_identity
from selfsup.methods import REGISTRY

SRC = '''"""Module doc."""
import math


class A:
    """Class doc."""

    def f(self, x):  # a comment
        """Function doc."""
        return math.sqrt(x) + 1
'''


def test_comments_docstrings_and_blank_lines_do_not_count():
    edited = SRC.replace("# a comment", "# another comment").replace("Function doc.", "Says more.")
    edited = "# header\n\n" + edited.replace('"""Class doc."""\n', '') + "\n# trailing\n"
    assert source_identity(edited) == source_identity(SRC)


def test_a_code_change_counts():
    for changed in (SRC.replace("+ 1", "+ 2"), SRC.replace("sqrt", "exp"),
                    SRC.replace("return math.sqrt(x) + 1", "y = 1\n        return math.sqrt(x) + y")):
        assert source_identity(changed) != source_identity(SRC)
    # a string that is not a docstring is code
    assert source_identity(SRC.replace("+ 1", "+ len('a')")) != source_identity(SRC.replace("+ 1", "+ len('b')"))


def test_a_comment_in_every_methods_closure_keeps_every_run_key(tmp_path: Path):
    for d in ("selfsup", "stages"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    starts = [("selfsup/engine/loop.py", m) for m in REGISTRY] + [("stages/evaluate.py", None), ("stages/voc.py", None)]
    before = {s: code_hash(closure(*s)) for s in starts}
    touched = sorted({f for s in starts for f in closure(*s)})
    for f in touched:
        p = tmp_path / f
        p.write_text(p.read_text() + "\n# a comment appended to every module of every closure\n")
        assert p.read_bytes() != (ROOT / f).read_bytes()
    assert {s: code_hash(closure(*s), root=tmp_path) for s in starts} == before
    # and one real edit in the shared loop changes every method's key
    p = tmp_path / "selfsup/engine/loop.py"
    p.write_text(p.read_text() + "\n_EDIT = 1\n")
    after = {s: code_hash(closure(*s), root=tmp_path) for s in starts if s[0] == "selfsup/engine/loop.py"}
    assert all(after[s] != before[s] for s in after)

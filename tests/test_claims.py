"""Issue 12, item 11: a measured number in a code comment, a params comment or the README names the
command in the repo that regenerates it (a benchmarks/ script, a `dvc exp run`, `python -m ...`),
or is not there. The check: every line that states a measurement (timings, speed ratios, "measured",
a kNN figure from a run) has such a command within the few lines around it."""
import re

from conftest import ROOT

CLAIM = re.compile(r"[Mm]easured(?! on (a )?\(?fixed| before)|~\d+(\.\d+)? ?(s|ms|us)\b|\b\d+(\.\d+)? (s|ms|us|ns/entry)\b"
                   r"|\d+(\.\d+)?x (faster|slower)|gave kNN|kNN-200 top-1 \d")
COMMAND = re.compile(r"benchmarks/|dvc exp run|dvc repro|python -m |metrics/|reports/|tests/")
WINDOW = 6


def claims(path):
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if path.suffix == ".py" and "#" not in line and not _in_docstring(lines, i):
            continue
        if path.name == "params.yaml" and "#" not in line:
            continue
        text = line.split("#", 1)[1] if path.name == "params.yaml" else line
        if CLAIM.search(text):
            around = "\n".join(lines[max(0, i - WINDOW):i + WINDOW + 1])
            if not COMMAND.search(around):
                yield f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()}"


def _in_docstring(lines, i):
    quotes = sum(line.count('"""') for line in lines[:i])
    return quotes % 2 == 1 or '"""' in lines[i]


def test_every_measured_number_names_its_command():
    files = [ROOT / "params.yaml", ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "selfsup").rglob("*.py")),
             *sorted((ROOT / "stages").glob("*.py")), *sorted((ROOT / "presets").glob("*.yaml"))]
    bad = [c for f in files for c in claims(f)]
    assert not bad, "numbers without the command that measures them:\n" + "\n".join(bad)

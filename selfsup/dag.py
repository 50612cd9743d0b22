"""Keep ``dvc.yaml``'s code deps equal to what each stage runs: ``python -m selfsup.dag``.

- Every stage's code deps (the ``stages/`` and ``selfsup/`` entries) become the import closure of
  its script (``selfsup.codedeps``); data deps stay as written. A ``foreach`` stage must run the
  same code for every item.
- The pretraining stages are written one per method, ``pretrain-<method>``, from the template
  below and ``params.yaml: methods``: their closures differ by method (SeLa runs Sinkhorn, MoCo
  the key queue...), and DVC's ``foreach`` can only vary a deps *entry*, not the length of the
  list, so a shared template would need the union of every method's code (editing a file only
  SeLa uses would re-run all of them). DVC reserves ``@`` for ``foreach`` names, hence the ``-``.

- The ``tokenizer`` stage (BEiT's visual tokens) is written while a method's upstream is its output
  ``data/tokenizer/tokenizer.pt`` and removed otherwise, so a preset without BEiT trains no tokeniser.

Adding a method: its file, its params block, its ``methods:`` entry, then this command; the
test ``test_dvc_yaml_is_generated`` fails until it has run. ``--check`` exits 1 when dvc.yaml
is stale instead of rewriting it.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

import yaml

from selfsup.codedeps import ROOT, closure

TRAINS = {"table1": "instdisc"}  # stages outside the per-method ones that train a method (registry lookup)
PRETRAIN = "pretrain-"
NO_UPSTREAM = "data/dataset"
# params a pretraining reads that change its result (workers, log_every, checkpoint_minutes and mlflow
# do not: every draw is seeded by position, and logging does not touch the state; the checkpoint
# key leaves them out for the same reason; the number of processes sets the global batch)
PRETRAIN_PARAMS = ["seed", "device", "precision", "channels_last", "compile", "model", "extract.batch_size",
                   "dataset.crop_size", "dataset.resize_size", "dist.nproc_per_node", "dist.nnodes"]


def is_code(dep: str) -> bool:
    """A Python file of the package or a stage script (regenerated); data files such as
    selfsup/paper_results.yaml are kept as written."""
    return dep.startswith(("stages/", "selfsup/")) and dep.endswith(".py")


def pretrain_stage(method: str, upstream: str) -> dict[str, Any]:
    deps = closure("stages/pretrain.py", method) + [NO_UPSTREAM]
    if upstream != NO_UPSTREAM:
        deps.append(upstream)  # the upstream encoder the method reads (MLCD clusters its features)
    return {
        "cmd": f"python stages/pretrain.py {method}",
        "deps": deps,
        "params": [*PRETRAIN_PARAMS, f"methods.{method}", method],
        "outs": [
            # resumable state (checkpoints, MLCD's assignment table): kept across runs and
            # experiments, resumed only on a matching key
            {f"data/pretrain/{method}": {"persist": True, "cache": False}},
            f"data/models/{method}.pt",
        ],
        "metrics": [{f"metrics/pretrain/{method}.json": {"cache": False}}],
        "plots": [{f"plots/pretrain/{method}.csv": {"cache": False, "x": "epoch", "y": "loss"}},
                  # what the method draws (Method.pictures: the colouriser's outputs), under reports/
                  *[{f"reports/{p}": {"cache": False}} for p in pictures(method)]],
    }


TOKENIZER = "tokenizer"
TOKENS = "data/tokenizer/tokenizer.pt"  # BEiT's upstream: the tokenizer stage's output


def tokenizer_stage() -> dict[str, Any]:
    """The tokenizer stage (BEiT's visual tokens), written only when a method reads its file."""
    return {
        "cmd": "python stages/tokenizer.py",
        "deps": [NO_UPSTREAM],  # the code deps are added with every stage's below
        "params": ["device", "channels_last", "dataset.crop_size", "dataset.resize_size", TOKENIZER],
        "outs": [TOKENS],
        "metrics": [{"metrics/tokenizer.json": {"cache": False}}],
    }


def pictures(method: str) -> tuple[str, ...]:
    from selfsup.methods import REGISTRY

    return REGISTRY[method].pictures if method in REGISTRY else ()


def generate(text: str, methods: dict[str, str]) -> str:
    """dvc.yaml ``text`` with its code deps and pretraining stages regenerated."""
    from ruamel.yaml import YAML  # a DVC dependency: keeps the file's comments and layout

    ry = YAML()
    ry.preserve_quotes = True
    ry.width = 120
    ry.indent(mapping=2, sequence=4, offset=2)
    doc = ry.load(text)
    stages = doc["stages"]
    for name in [n for n in stages if n.startswith(PRETRAIN)]:
        del stages[name]
    # the tokenizer stage exists while a method reads its file (a preset without BEiT: no tokeniser run)
    if TOKENS in methods.values() and TOKENIZER not in stages:
        at = list(stages).index("evaluate") if "evaluate" in stages else len(stages)
        stages.insert(at, TOKENIZER, tokenizer_stage())
    elif TOKENS not in methods.values() and TOKENIZER in stages:
        del stages[TOKENIZER]
    for name, stage in stages.items():
        body = stage["do"] if "foreach" in stage else stage
        script = f"stages/{name}.py"
        if not (ROOT / script).is_file():
            raise SystemExit(f"dvc.yaml: stage {name} has no script {script}")
        code = closure(script, TRAINS.get(name))
        deps = body.get("deps") or []
        data = [d for d in deps if not is_code(str(d))]
        deps.clear()
        deps.extend(code + data)
    pos = list(stages).index("download") + 1 if "download" in stages else 0
    for i, (m, up) in enumerate(methods.items()):
        stages.insert(pos + i, f"{PRETRAIN}{m}", pretrain_stage(m, up))
    out = io.StringIO()
    ry.dump(doc, out)
    return out.getvalue()


def methods_of(params: Path) -> dict[str, str]:
    ms = (yaml.safe_load(params.read_text()) or {}).get("methods") or {}
    return {m: NO_UPSTREAM for m in ms} if isinstance(ms, list) else dict(ms)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml is stale, change nothing")
    ap.add_argument("--root", default=str(ROOT))
    a = ap.parse_args(argv)
    root = Path(a.root)
    path = root / "dvc.yaml"
    text = path.read_text()
    new = generate(text, methods_of(root / "params.yaml"))
    if new == text:
        print("dvc.yaml: up to date")
        return 0
    if a.check:
        print("dvc.yaml: stale; run `python -m selfsup.dag`", file=sys.stderr)
        return 1
    path.write_text(new)
    print("dvc.yaml: code deps and pretraining stages regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())

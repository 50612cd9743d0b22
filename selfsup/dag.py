"""Keep the DAG's files equal to what each stage runs: ``python -m selfsup.dag``.

The DAG is split over several ``dvc.yaml`` files, each with its own ``dvc.lock``:

- ``dvc.yaml`` (hand-written, code deps regenerated): the shared stages, ``download``,
  ``tokenizer``, ``evaluate`` and ``voc`` (every method's frozen evaluations, and its detection
  transfer, each in one process; their outputs follow the method list), ``report`` and InstDisc's
  Table 1 (``table1@<row>``, ``table1_report``).
- ``pipelines/<method>/dvc.yaml`` (written whole from the templates below, one per
  ``params.yaml: methods`` entry): that method's training, stage ``pretrain`` (addressed as
  ``pipelines/<m>/dvc.yaml:pretrain``; ``dvc repro pipelines/<m>/dvc.yaml`` trains one method and
  what it needs). They run from the repository root (``wdir: ../..``), so every path and the
  params file are the same as in the root file.

Why split (and why ``evaluate`` and ``voc`` are one stage each): after every stage DVC re-parses and
rewrites the whole lock file of its ``dvc.yaml`` with a pure-Python YAML round trip. With one file
for the 22-method default (77 stages, a 550 KB lock) that was about 5 s per stage, more than most stages' own work on digits; with one small lock
per method it is a fraction of a second (README "The DAG", ``benchmarks/stage_overhead.py``). Each
process start still imports torch (and scikit-learn or torchvision), about 4 s here; an evaluation
and a detector per method as their own stages cost 44 of them, so the ``evaluate`` and ``voc`` stages
loop over the methods and reuse a method's result while its model and the rest are unchanged
(``selfsup.frozen.evaluate_all``, ``selfsup.detection.transfer_all``).

Every stage's code deps (the ``stages/`` and ``selfsup/`` entries) are the import closure of its
script (``selfsup.codedeps``); data deps stay as written. Pretraining closures differ by method
(SeLa runs Sinkhorn, MoCo the key queue...), so editing a file only SeLa uses re-runs only SeLa.

The ``tokenizer`` stage (BEiT's visual tokens) is written while a method's upstream is its output
``data/tokenizer/tokenizer.pt`` and removed otherwise, so a preset without BEiT trains no tokeniser.

Adding a method: its file, its params block, its ``methods:`` entry, then this command; the test
``test_dag_files_are_generated`` fails until it has run. ``--check`` exits 1 when a file is stale
instead of rewriting it.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

import yaml

from selfsup.codedeps import ROOT, closure

TRAINS = {"table1": "instdisc"}  # root stages that train a method (registry lookup)
PIPELINES = "pipelines"  # pipelines/<method>/dvc.yaml
BRANCH = ("pretrain",)  # the stages of one method's file
WDIR = "../.."  # a method's stages run from the repository root
NO_UPSTREAM = "data/dataset"
# params a pretraining reads that change its result (workers, log_every, checkpoint_minutes and mlflow
# do not: every draw is seeded by position, and logging does not touch the state; the checkpoint
# key leaves them out for the same reason; the number of processes sets the global batch)
PRETRAIN_PARAMS = ["seed", "device", "precision", "channels_last", "compile", "model", "extract.batch_size",
                   "dataset.crop_size", "dataset.resize_size", "dist.nproc_per_node", "dist.nnodes"]
HEADER = """\
# The {method} branch of the DAG: pretrain -> {{evaluate, voc}} -> report (those in the root dvc.yaml).
# Written by `python -m selfsup.dag` from params.yaml `methods` and the templates in
# selfsup/dag.py: edit those, not this file. Its own file so that its own small dvc.lock is
# what DVC rewrites after each of these stages (selfsup/dag.py says why).
"""


def is_code(dep: str) -> bool:
    """A Python file of the package or a stage script (regenerated); data files such as
    selfsup/paper_results.yaml are kept as written."""
    return dep.startswith(("stages/", "selfsup/")) and dep.endswith(".py")


def pipeline_file(method: str) -> str:
    return f"{PIPELINES}/{method}/dvc.yaml"


def address(method: str, stage: str) -> str:
    """The name DVC gives a method's stage (``dvc repro``, ``dvc status``, "Running stage ...")."""
    return f"{pipeline_file(method)}:{stage}"


def branch(methods) -> set[str]:
    """The DVC addresses of the methods' stages."""
    return {address(m, s) for m in methods for s in BRANCH}


def pretrain_stage(method: str, upstream: str) -> dict[str, Any]:
    """The training loop (resumable at any step), the final encoder, per-epoch history, the live MLflow run."""
    deps = closure("stages/pretrain.py", method) + [NO_UPSTREAM]
    if upstream != NO_UPSTREAM:
        deps.append(upstream)  # the upstream encoder the method reads (MLCD clusters its features)
    return {
        "wdir": WDIR,
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


EVALUATE = "evaluate"


def evaluate_outputs(methods) -> dict[str, list[Any]]:
    """The root ``evaluate`` stage's outputs: every method's features and step metrics, and the stored
    metrics it reuses while a method's key holds (selfsup.frozen.evaluate_all). The features persist:
    a reused method's stay as they were written."""
    return {"outs": [{"data/features": {"persist": True, "cache": False}},
                     {"data/eval_runs": {"persist": True, "cache": False}}],
            "metrics": [{f"metrics/{step}/{m}.json": {"cache": False}}
                        for m in methods for step in ("extract", "knn", "cluster", "linear", "finetune")]}


VOC = "voc"


def voc_outputs(methods) -> dict[str, list[Any]]:
    """The root ``voc`` stage's outputs: every method's detection numbers, and the per-method results it
    reuses while their key holds (selfsup.detection.transfer_all)."""
    return {"outs": [{"data/voc_runs": {"persist": True, "cache": False}},
                     *[{f"metrics/voc/{m}_classes.csv": {"cache": False}} for m in methods]],
            "metrics": [{f"metrics/voc/{m}.json": {"cache": False}} for m in methods]}


PER_METHOD_OUTPUTS = {EVALUATE: evaluate_outputs, VOC: voc_outputs}
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


def _yaml():
    from ruamel.yaml import YAML  # a DVC dependency: keeps the root file's comments and layout

    ry = YAML()
    ry.preserve_quotes = True
    ry.width = 120
    ry.indent(mapping=2, sequence=4, offset=2)
    return ry


def generate(text: str, methods: dict[str, str]) -> str:
    """The root dvc.yaml ``text`` with its code deps regenerated and the tokenizer stage present
    exactly while a method reads its output."""
    ry = _yaml()
    doc = ry.load(text)
    stages = doc["stages"]
    # the tokenizer stage exists while a method reads its file (a preset without BEiT: no tokeniser run)
    if TOKENS in methods.values() and TOKENIZER not in stages:
        at = list(stages).index("download") + 1 if "download" in stages else 0
        stages.insert(at, TOKENIZER, tokenizer_stage())
    elif TOKENS not in methods.values() and TOKENIZER in stages:
        del stages[TOKENIZER]
    for name, stage in stages.items():
        if name in BRANCH or name.startswith("pretrain-"):
            raise SystemExit(f"dvc.yaml: stage {name} belongs in {PIPELINES}/<method>/dvc.yaml (written by "
                             "`python -m selfsup.dag`), not the root dvc.yaml")
        body = stage["do"] if "foreach" in stage else stage
        script = f"stages/{name}.py"
        if not (ROOT / script).is_file():
            raise SystemExit(f"dvc.yaml: stage {name} has no script {script}")
        deps = body.get("deps") or []
        data = [d for d in deps if not is_code(str(d))]
        deps.clear()
        deps.extend(closure(script, TRAINS.get(name)) + data)
        if name in PER_METHOD_OUTPUTS:  # every method in one process: its outputs follow the method list
            body.update(PER_METHOD_OUTPUTS[name](methods))
    out = io.StringIO()
    ry.dump(doc, out)
    return out.getvalue()


def method_pipeline(method: str, upstream: str) -> str:
    """The text of ``pipelines/<method>/dvc.yaml``."""
    doc = {"stages": {"pretrain": pretrain_stage(method, upstream)}}
    out = io.StringIO()
    _yaml().dump(doc, out)
    return HEADER.format(method=method) + out.getvalue()


def plan(root: Path, methods: dict[str, str]) -> dict[Path, str | None]:
    """Every DAG file's wanted text, None for a method file to delete (its method left ``methods``)."""
    want: dict[Path, str | None] = {root / "dvc.yaml": generate((root / "dvc.yaml").read_text(), methods)}
    for m, up in methods.items():
        want[root / pipeline_file(m)] = method_pipeline(m, up)
    for f in sorted((root / PIPELINES).glob("*/dvc.yaml")):
        if f.parent.name not in methods:
            want[f] = None
    return want


def changed(root: Path, methods: dict[str, str]) -> dict[Path, str | None]:
    """The DAG files whose text differs from ``plan``'s, with the wanted text (None: delete)."""
    return {f: text for f, text in plan(root, methods).items() if (f.read_text() if f.is_file() else None) != text}


def methods_of(params: Path) -> dict[str, str]:
    ms = (yaml.safe_load(params.read_text()) or {}).get("methods") or {}
    return {m: NO_UPSTREAM for m in ms} if isinstance(ms, list) else dict(ms)


def stages_of(root: Path) -> dict[str, dict[str, Any]]:
    """Every stage of the DAG files under ``root`` by its DVC address (foreach stages unexpanded)."""
    out = {}
    for f in [root / "dvc.yaml", *sorted((root / PIPELINES).glob("*/dvc.yaml"))]:
        prefix = "" if f.parent == root else f"{f.relative_to(root)}:"
        for name, body in (yaml.safe_load(f.read_text()) or {}).get("stages", {}).items():
            out[prefix + name] = body
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a DAG file is stale, change nothing")
    ap.add_argument("--root", default=str(ROOT))
    a = ap.parse_args(argv)
    root = Path(a.root)
    todo = changed(root, methods_of(root / "params.yaml"))
    if not todo:
        print("dvc.yaml, pipelines/: up to date")
        return 0
    rel = ", ".join(str(f.relative_to(root)) for f in todo)
    if a.check:
        print(f"stale: {rel}; run `python -m selfsup.dag`", file=sys.stderr)
        return 1
    for f, text in todo.items():
        if text is None:  # a method no longer in params.yaml: its branch and its lock go
            f.unlink()
            (f.parent / "dvc.lock").unlink(missing_ok=True)
            if not any(f.parent.iterdir()):
                f.parent.rmdir()
        else:
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)
    print(f"regenerated: {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

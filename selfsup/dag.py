"""Keep the DAG's file equal to what each stage runs: ``python -m selfsup.dag``.

``dvc.yaml`` is hand-written except for what follows the method list, which this command writes:

- ``check``: the first stage (params.yaml, every key, through the typed config and
  ``selfsup.data.preflight``), whose output every other stage depends on, so a bad key fails before DVC
  removes any stage's outputs;

- ``pretrain-<m>``: one stage per method (``selfsup.engine.pretrain_all.train_all`` of that method),
  written whole from ``pretrain_stage``: its import closure, its params block, its upstream file,
  its outputs; ``dvc repro pretrain-<m>`` trains one method and ``dvc status`` names it;
- the outputs of ``evaluate`` and ``voc`` (every method's frozen evaluations, and its detection
  transfer, each in one process), and the ``tokenizer`` stage (BEiT's visual tokens), present while
  a method's upstream is its output ``data/tokenizer/tokenizer.pt`` (a preset without BEiT trains no
  tokeniser);
- every other stage's code deps (the ``stages/`` and ``selfsup/`` entries): the import closure of its
  script (``selfsup.core.codedeps``) and the schema files of the sections its params name
  (``section_deps``); data deps stay as written.

Why ``evaluate`` and ``voc`` stay one stage per kind of work: each process start imports torch (and
scikit-learn or torchvision) and opens the MLflow store, about 5 s here (benchmarks/imports.py), more
than one method's evaluations or detector cost on digits. They keep per-method granularity themselves,
reusing a method's stored result while its model and keys hold (``selfsup.core.io.ResultCache``; the
stores are cached outputs, so queued experiments and pulled clones have them). Training resumes a
method's checkpoint while its key (config, code closure, data, upstream encoder) holds
(``selfsup.engine.loop.run_key``). So a change to one method's block or file retrains and
re-evaluates that method only.

An earlier layout put each method's training in ``pipelines/<m>/dvc.yaml``; this command deletes
such files (and their locks).

Adding a method: its file, its params block, its ``methods:`` entry, then this command; the test
``test_dag_files_are_generated`` fails until it has run. ``--check`` exits 1 when the file is stale
instead of rewriting it.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

import yaml

from selfsup.core.codedeps import ROOT, closure
from selfsup.core.config import SECTIONS, load_config, load_yaml, method_names, section_file
from selfsup.core.stage import CHECKED  # the check stage's output, every other stage's dep

TRAINS = {"table1": "instdisc"}  # root stages that train a method (registry lookup)
PIPELINES = "pipelines"  # the earlier layout's pipelines/<method>/dvc.yaml, deleted when found
PRETRAIN = "pretrain"
NO_UPSTREAM = "data/dataset"
# params a pretraining reads that change its result (workers, log_every, checkpoint_minutes and mlflow
# do not: every draw is seeded by position, and logging does not touch the state; the checkpoint
# key leaves them out for the same reason; the number of processes sets the global batch)
PRETRAIN_PARAMS = ["seed", "device", "precision", "channels_last", "compile", "model", "extract.batch_size",
                   "dataset.crop_size", "dataset.resize_size", "dist.nproc_per_node", "dist.nnodes"]


def section_deps(params: list[Any]) -> list[str]:
    """The schema files of the sections a stage's params name (``selfsup.core.config.SECTIONS``): a
    section is typed by name, not by an import, so its schema joins the stage's code deps here (a
    changed default or check re-runs exactly the stages that read the section). ``params.yaml:``
    with no list (the check stage) reads every section."""
    names: set[str] = set()
    for p in params:
        keys = [p] if isinstance(p, str) else [k for v in p.values() for k in (v if v is not None else SECTIONS)]
        names |= {str(k).split(".")[0] for k in keys}
    return sorted(section_file(s) for s in names & set(SECTIONS))


def is_code(dep: str) -> bool:
    """A Python file of the package or a stage script (regenerated); data files such as
    selfsup/report/paper_results.yaml are kept as written."""
    return dep.startswith(("stages/", "selfsup/")) and dep.endswith(".py")


CHECK = "check"


def check_stage() -> dict[str, Any]:
    """The first stage: params.yaml, every key of it (``params.yaml:`` with no list), through the typed
    config and ``selfsup.data.preflight``, so that a bad key fails before DVC removes any stage's outputs.
    Its code deps: its script's closure and every method file (each method block is parsed with its
    method's config class)."""
    return {"cmd": "python stages/check.py", "deps": [], "params": [{"params.yaml": None}],
            "outs": [{CHECKED: {"cache": False}}]}


def check_code() -> list[str]:
    """The check stage's code: its script's closure, and the method registry's closure with every method
    (``load_config`` imports each method by name to parse its block)."""
    from selfsup.core.codedeps import REGISTRY_FILE

    return sorted({*closure("stages/check.py"), *(f for m in method_names() for f in closure(REGISTRY_FILE, m)),
                   *section_deps(check_stage()["params"])})


def pretrain_name(method: str) -> str:
    """The DVC stage that trains ``method``: ``dvc repro pretrain-moco`` trains MoCo alone, and ``dvc status``
    names the method whose key changed (DVC reserves ``@`` for ``foreach`` stages, whose deps cannot
    differ per item; each method's code closure does)."""
    return f"{PRETRAIN}-{method}"


def pretrain_stage(method: str, upstream: str) -> dict[str, Any]:
    """One method's training loop (resumable at any step), final encoder, per-epoch history, pictures
    and live MLflow run (``selfsup.engine.pretrain_all``): its own code closure, its params block,
    its upstream file (MLCD: DeepCluster's encoder, so DVC trains DeepCluster first)."""
    code = sorted({*closure("stages/pretrain.py", method), *section_deps(PRETRAIN_PARAMS)})
    ups = [] if upstream == NO_UPSTREAM else [upstream]
    return {
        "cmd": f"python stages/pretrain.py {method}",
        "deps": [*code, CHECKED, NO_UPSTREAM, *ups],
        "params": [*PRETRAIN_PARAMS, f"methods.{method}", method],
        "outs": [
            # resumable state (checkpoint, MLCD's assignment table): kept across runs and resumed
            # only on a matching key; in DVC's cache, so that a queued or temporary experiment (DVC
            # checks the outputs out into its copy) and a clone that pulls reuse it
            {f"data/pretrain/{method}": {"persist": True}},
            f"data/models/{method}.pt",
        ],
        "metrics": [{f"metrics/pretrain/{method}.json": {"cache": False}}],
        "plots": [{f"plots/pretrain/{method}.csv": {"cache": False, "x": "epoch", "y": "loss"}},
                  # what a method draws (Method.pictures: the colouriser's outputs), under reports/
                  *[{f"reports/{p}": {"cache": False}} for p in pictures(method)]],
    }


EVALUATE = "evaluate"


def evaluate_outputs(methods) -> dict[str, list[Any]]:
    """The root ``evaluate`` stage's outputs: every method's features and step metrics, and the stored
    metrics it reuses while a method's key holds (selfsup.eval.evaluate_all.evaluate_all). The features persist:
    a reused method's stay as they were written."""
    return {"outs": [{"data/features": {"persist": True}},  # cached: see pretrain_stage's data/pretrain
                     {"data/eval_runs": {"persist": True}}],
            "metrics": [{f"metrics/{step}/{m}.json": {"cache": False}}
                        for m in methods for step in ("extract", "knn", "cluster", "linear", "finetune")]}


VOC = "voc"


def voc_outputs(methods) -> dict[str, list[Any]]:
    """The root ``voc`` stage's outputs: every method's detection numbers, and the per-method results it
    reuses while their key holds (selfsup.detection.detector.transfer_all)."""
    return {"outs": [{"data/voc_runs": {"persist": True}},  # cached: see pretrain_stage's data/pretrain
                     *[{f"metrics/voc/{m}_classes.csv": {"cache": False}} for m in methods]],
            "metrics": [{f"metrics/voc/{m}.json": {"cache": False}} for m in methods]}


TABLE1 = "table1"


def table1_outputs(rows) -> dict[str, list[Any]]:
    """The ``table1`` stage's metrics: one file per row of ``instdisc_table1.rows`` (none: no key)."""
    return {"metrics": [{f"metrics/table1/{r}.json": {"cache": False}} for r in rows]} if rows else {}


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


def generate(text: str, methods: dict[str, str], rows: list[str], voc: bool = True) -> str:
    """The root dvc.yaml ``text`` with its code deps regenerated, the ``pretrain-<m>`` stages written from
    the method list, and the tokenizer stage present exactly while a method reads its output."""
    ry = _yaml()
    doc = ry.load(text)
    stages = doc["stages"]
    if CHECK not in stages:  # first: every other stage depends on it
        stages.insert(0, CHECK, check_stage())
    # the tokenizer stage exists while a method reads its file (a preset without BEiT: no tokeniser run)
    if TOKENS in methods.values() and TOKENIZER not in stages:
        at = list(stages).index("download") + 1 if "download" in stages else 0
        stages.insert(at, TOKENIZER, tokenizer_stage())
    elif TOKENS not in methods.values() and TOKENIZER in stages:
        del stages[TOKENIZER]
    for name in [n for n in stages if n == PRETRAIN or n.startswith(f"{PRETRAIN}-")]:
        del stages[name]  # written whole, one per method, after download and the tokenizer
    names = list(stages)
    at = max([names.index(s) + 1 for s in ("download", TOKENIZER) if s in names], default=0)
    for i, (m, up) in enumerate(methods.items()):
        stages.insert(at + i, pretrain_name(m), pretrain_stage(m, up))
    for name, stage in stages.items():
        if name.startswith(f"{PRETRAIN}-"):
            continue  # written whole above
        body = stage["do"] if "foreach" in stage else stage
        script = f"stages/{name}.py"
        if not (ROOT / script).is_file():
            raise SystemExit(f"dvc.yaml: stage {name} has no script {script}")
        deps = body.setdefault("deps", [])
        data = [d for d in deps if not is_code(str(d))]
        if name != CHECK and CHECKED not in data:
            data.insert(0, CHECKED)
        deps.clear()
        code = check_code() if name == CHECK else sorted({*closure(script, TRAINS.get(name)),
                                                          *section_deps(list(body.get("params", [])))})
        deps.extend(code + data)
        if name in PER_METHOD_OUTPUTS:  # every method in one process: its outputs follow the method list
            body.update(PER_METHOD_OUTPUTS[name](methods if voc or name != VOC else {}))
        if name == TABLE1:  # every row in one process: its metrics follow instdisc_table1.rows
            body.pop("metrics", None)
            body.update(table1_outputs(rows))
    out = io.StringIO()
    ry.dump(doc, out)
    return out.getvalue()


def plan(root: Path, methods: dict[str, str], rows: list[str], voc: bool = True) -> dict[Path, str | None]:
    """Every DAG file's wanted text; None for a file of the earlier per-method layout, to delete."""
    want: dict[Path, str | None] = {root / "dvc.yaml": generate((root / "dvc.yaml").read_text(), methods, rows, voc)}
    for f in sorted((root / PIPELINES).glob("*/dvc.yaml")):
        want[f] = None
    return want


def changed(root: Path, methods: dict[str, str], rows: list[str], voc: bool = True) -> dict[Path, str | None]:
    """The DAG files whose text differs from ``plan``'s, with the wanted text (None: delete)."""
    return {f: text for f, text in plan(root, methods, rows, voc).items()
            if (f.read_text() if f.is_file() else None) != text}


def methods_of(params: Path) -> dict[str, str]:
    ms = (load_yaml(params.read_text()) or {}).get("methods") or {}
    return {m: NO_UPSTREAM for m in ms} if isinstance(ms, list) else dict(ms)


def rows_of(params: Path) -> list[str]:
    """The rows of InstDisc's Table 1 that the ``table1`` stage runs (``Config.table1_rows``: none while the
    sweep is off). The stage's params leave ``methods`` out (a new method would re-run it): the rows'
    outputs declared here change when the sweep turns on or off, and DVC re-runs a stage whose outputs
    changed."""
    return list(load_config(params, parse_methods=False).table1_rows())


def voc_of(params: Path) -> bool:
    """Whether the ``voc`` stage trains detectors (``voc.enabled``): its per-method outputs exist only then."""
    return load_config(params, parse_methods=False).voc.enabled


def stages_of(root: Path) -> dict[str, dict[str, Any]]:
    """Every stage of ``root``'s dvc.yaml by name (foreach stages unexpanded)."""
    return dict((yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {}))


def stale_lock_entries(root: Path) -> list[str]:
    """Entries of ``dvc.lock`` for stages ``dvc.yaml`` no longer has: DVC never prunes them, and re-parses
    and rewrites them after every stage."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return []
    stages = stages_of(root)
    keep = set(stages) | {f"{n}@" for n, b in stages.items() if "foreach" in b}
    entries = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    return [e for e in entries if e not in keep and e.split("@")[0] + "@" not in keep]


def prune_lock(root: Path, names: list[str]) -> None:
    """Drop those entries from ``dvc.lock``, written in DVC's own layout."""
    from dvc.utils.serialize import modify_yaml

    with modify_yaml(root / "dvc.lock") as doc:
        for n in names:
            del doc["stages"][n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a DAG file is stale, change nothing")
    ap.add_argument("--root", default=str(ROOT))
    a = ap.parse_args(argv)
    root = Path(a.root)
    params = root / "params.yaml"
    todo = changed(root, methods_of(params), rows_of(params), voc_of(params))
    if not todo:
        stale = stale_lock_entries(root)
        if stale and a.check:
            print(f"dvc.lock: entries of removed stages ({', '.join(stale)}); run `python -m selfsup.dag`",
                  file=sys.stderr)
            return 1
        if stale:
            prune_lock(root, stale)
            print(f"dvc.lock: pruned the entries of removed stages: {', '.join(stale)}")
        print("dvc.yaml: up to date")
        return 0
    rel = ", ".join(str(f.relative_to(root)) for f in todo)
    if a.check:
        print(f"stale: {rel}; run `python -m selfsup.dag`", file=sys.stderr)
        return 1
    for f, text in todo.items():
        if text is None:  # the earlier layout's pipelines/<m>/dvc.yaml: it and its lock go
            f.unlink()
            (f.parent / "dvc.lock").unlink(missing_ok=True)
            if not any(f.parent.iterdir()):
                f.parent.rmdir()
            if (root / PIPELINES).is_dir() and not any((root / PIPELINES).iterdir()):
                (root / PIPELINES).rmdir()
        else:
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)
    print(f"regenerated: {rel}")
    if stale := stale_lock_entries(root):
        prune_lock(root, stale)
        print(f"dvc.lock: pruned the entries of removed stages: {', '.join(stale)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: what a DAG stage costs besides its work.

``--stages``: the start-up of each stage of this repository's DAG. In a workspace where ``dvc repro``
has run (``dvc status`` clean), it runs each stage's command as ``dvc.yaml`` gives it, in order,
``--repeat`` times, and prints the median seconds: with every method's key unchanged each stage trains
and evaluates nothing (a training stage resumes its finished run, the others reuse their stored
results), so the seconds are the process's start (interpreter, imports, the config, the data, MLflow's
set-up) and its reuse checks. The models and results are rewritten byte for byte; the metrics of the
stages that record their own seconds (download, tokenizer, voc_data) change, so ``dvc commit -f``
afterwards (or ``dvc repro``, which re-runs those three).

    .venv/bin/python benchmarks/stage_overhead.py --stages [--repeat 1] [--only pretrain]

Without ``--stages``: DVC's own seconds per stage, one dvc.yaml for the whole DAG against one per
method. After every stage DVC re-parses and rewrites the lock file of that stage's dvc.yaml (a pure-Python
YAML round trip), so its cost grows with the lock. This builds two throw-away DVC repositories with
the same stages (``--methods`` x 3 stages plus ``--shared``, each listing ``--deps`` code files, as
the default DAG's stages do), whose commands do nothing, runs ``dvc repro`` in each, and prints the
seconds per stage: DVC's overhead, without the stages' own work or imports.

    .venv/bin/python benchmarks/stage_overhead.py [--methods 21] [--shared 11] [--deps 30]

The layout with one file per method is the one ``python -m selfsup.dag`` writes (selfsup/dag.py).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BRANCH = ("pretrain", "evaluate", "voc")


def stage(name: str, deps: list[str], wdir: str | None) -> dict:
    body = {"cmd": f"{sys.executable} -c \"open('out/{name}','w').write('x')\"",
            "deps": deps, "params": ["seed"], "outs": [{f"out/{name}": {"cache": False}}]}
    return {"wdir": wdir, **body} if wdir else body


def build(root: Path, methods: int, shared: int, ndeps: int, split: bool) -> int:
    (root / "code").mkdir(parents=True)
    (root / "out").mkdir()
    deps = []
    for i in range(ndeps):
        (root / "code" / f"m{i}.py").write_text(f"# module {i}\n")
        deps.append(f"code/m{i}.py")
    (root / "params.yaml").write_text("seed: 0\n")
    top = {f"shared{i}": stage(f"shared{i}", deps, None) for i in range(shared)}
    for m in range(methods):
        names = {s: f"{s}_{m}" for s in BRANCH}
        if split:
            f = root / "pipelines" / f"m{m}" / "dvc.yaml"
            f.parent.mkdir(parents=True)
            f.write_text(yaml.safe_dump({"stages": {s: stage(n, deps, "../..") for s, n in names.items()}}))
        else:
            top.update({n: stage(n, deps, None) for n in names.values()})
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": top}))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, env=env)
    return methods * len(BRANCH) + shared


def timed_repro(root: Path) -> float:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    cmd = [sys.executable, "-m", "dvc", "repro", "-q", "-f", "-P"]  # every dvc.yaml (no report ties them here)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=root, check=True, env=env, capture_output=True)
    return time.perf_counter() - t0


def stage_startups(repeat: int, only: str | None) -> None:
    """The median wall seconds of each stage's command of ./dvc.yaml with every result reused."""
    import shlex
    import statistics

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "-q"], cwd=root, env=env)
    if status.returncode != 0:
        raise SystemExit("dvc status: the workspace has changed stages; run `dvc repro` first, so that every "
                         "stage below reuses its results and times only its start")
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    total, rows = 0.0, []
    for name, body in stages.items():
        if only and not name.startswith(only):
            continue
        cmd = shlex.split(body["cmd"])
        cmd = [sys.executable, *cmd[1:]] if cmd[0] == "python" else cmd
        runs = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
            runs.append(time.perf_counter() - t0)
        rows.append((name, statistics.median(runs)))
        total += rows[-1][1]
        print(f"{name:28s} {rows[-1][1]:6.2f} s", flush=True)
    print(f"{len(rows)} stages: {total:.1f} s in all, {total / max(1, len(rows)):.2f} s per stage")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", action="store_true", help="time each stage of this repository's DAG, all reused")
    ap.add_argument("--repeat", type=int, default=1, help="--stages: runs per stage (the median is printed)")
    ap.add_argument("--only", help="--stages: only the stages whose name starts so (e.g. pretrain)")
    ap.add_argument("--methods", type=int, default=21)
    ap.add_argument("--shared", type=int, default=11)
    ap.add_argument("--deps", type=int, default=30, help="code deps listed by every stage")
    args = ap.parse_args()
    if args.stages:
        stage_startups(args.repeat, args.only)
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        python_start = time.perf_counter() - base
        for split in (False, True):
            root = Path(tmp) / ("split" if split else "single")
            n = build(root, args.methods, args.shared, args.deps, split)
            timed_repro(root)  # first run: writes the locks
            s = timed_repro(root)  # forced re-run with the locks in place, as after a code change
            lock = sum(f.stat().st_size for f in root.rglob("dvc.lock"))
            layout = "one dvc.yaml per method" if split else "one dvc.yaml"
            print(f"{layout:24s} {n} stages: {s:6.1f} s, {s / n - python_start:.2f} s of DVC per stage "
                  f"(locks {lock / 1e3:.0f} KB in all)")


if __name__ == "__main__":
    main()

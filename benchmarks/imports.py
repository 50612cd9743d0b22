"""Benchmark: the start-up costs the stage scripts are arranged around (lazy imports in
selfsup/core/io.py, models.py, augment.py, evaluate.py, kmeans.py; MLflow's set-up in tracking.py).

Each import is timed in a fresh interpreter (median of --repeat runs), as a DVC stage pays it:

    .venv/bin/python benchmarks/imports.py [--repeat 3]

Prints seconds per import (torch, torchvision, torch + torchvision, scikit-learn + scipy as
a clustering metric loads them, faiss, mlflow), what ``gc.freeze`` at exit saves after those imports
(selfsup/core/stage.py), and the seconds to create a fresh MLflow SQLite store.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "torch": "import torch",
    "torchvision": "import torch, torchvision",
    # what selfsup.cluster.metrics imports when a metric is computed (not with the module)
    "scikit-learn + scipy (a clustering metric)": "import sklearn.metrics, scipy.optimize",
    "faiss": "import faiss",
    "mlflow": "import mlflow",
}
EXIT = "import torch, torchvision"  # the interpreter's exit after the imports every training stage makes
FROZEN_EXIT = "import atexit, gc; atexit.register(gc.freeze); import torch, torchvision"  # selfsup.core.stage.setup
STORE = ("import mlflow, sys; mlflow.set_tracking_uri('sqlite:///' + sys.argv[1]); "
         "mlflow.set_experiment('bench')")


def timed(code: str, *args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], check=True, cwd=ROOT, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    base = statistics.median(timed("pass") for _ in range(a.repeat))
    print(f"bare interpreter: {base:.2f} s (subtracted below)")
    for name, code in CASES.items():
        t = statistics.median(timed(code) for _ in range(a.repeat)) - base
        print(f"import {name}: {t:.2f} s")
    plain, frozen = (statistics.median(timed(c) for _ in range(a.repeat)) for c in (EXIT, FROZEN_EXIT))
    print(f"exit after torch + torchvision: {plain - frozen:.2f} s more than with gc.freeze at exit "
          f"({plain - base:.2f} s against {frozen - base:.2f} s in all)")
    with tempfile.TemporaryDirectory() as d:
        runs = [timed(STORE, str(Path(d) / f"m{i}.db")) - base for i in range(a.repeat)]
    print(f"mlflow import + new SQLite store: {statistics.median(runs):.2f} s")


if __name__ == "__main__":
    main()

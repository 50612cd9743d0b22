"""Seconds of one training epoch per method (params.yaml blocks, digits), run back to back,
and each relative to the first method: on a shared / loaded machine the ratios are the
figure to read (a method's default pretraining ~ ratio x epochs x the reference's epoch).

    python benchmarks/epoch_cost.py [--methods deepcluster,invaspread,moco,simclr] [--epochs 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from selfsup.core.config import load_config  # noqa: E402
from selfsup.data.prepared import load_prepared  # noqa: E402
from selfsup.data.sources import prepare  # noqa: E402
from selfsup.engine.loop import pretrain  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--methods", default="deepcluster,invaspread,moco,simclr")
    ap.add_argument("--epochs", type=int, default=2, help="epochs timed per method (the mean is printed)")
    args = ap.parse_args()
    raw = yaml.safe_load(Path(args.params).read_text())
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config({**raw, "methods": methods})
        prepare(cfg.dataset, cfg.seed, Path(tmp) / "dataset")
        data = load_prepared(Path(tmp) / "dataset")
        rows = []
        for m in methods:
            block = {**raw.get(m, {}), "epochs": args.epochs, "warmup_epochs": 0}
            c = load_config({**raw, "methods": [m], m: block})
            _, hist = pretrain(c, m, data, Path(tmp) / f"{m}.pt")
            sec = sum(h["seconds"] for h in hist) / len(hist)
            rows.append((m, sec, raw.get(m, {}).get("epochs", 0)))
        ref = rows[0][1]
        print(f"{'method':<12} {'s/epoch':>8} {'ratio':>6} {'epochs':>6} {'est. s':>7}")
        for m, sec, ep in rows:
            print(f"{m:<12} {sec:8.2f} {sec / ref:6.2f} {ep:6d} {sec * ep:7.1f}")


if __name__ == "__main__":
    main()

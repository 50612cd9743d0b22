"""Seconds per stage, images/s of feature extraction and training, and peak memory, for the
pipeline on a config (default: params.yaml), run in-process in a temporary folder.

    python benchmarks/pipeline.py [--params params.yaml] [--methods deepcluster,random]

Prints one row per (stage, method). Peak memory is the process' max RSS so far
(ru_maxrss), so it only grows down the table.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfsup.core.config import load_config  # noqa: E402
from selfsup.data.prepared import load_prepared  # noqa: E402
from selfsup.data.sources import prepare  # noqa: E402
from selfsup.eval.protocols import cluster_eval, knn_protocols, linear_eval  # noqa: E402
from selfsup.models.features import extract_features  # noqa: E402
from selfsup.core.io import resolve_device  # noqa: E402
from selfsup.models.backbones import save_backbone  # noqa: E402
from selfsup.cluster.pca import PCAWhitening  # noqa: E402
from selfsup.engine.loop import pretrain  # noqa: E402


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--methods", default="")
    args = ap.parse_args()
    cfg = load_config(args.params)
    methods = args.methods.split(",") if args.methods else cfg.methods
    dev = resolve_device(cfg.device)
    rows = []

    def row(stage: str, m: str, seconds: float, ips: float | None = None) -> None:
        rows.append((stage, m, seconds, ips, peak_mb()))
        print(f"{stage:10s} {m:12s} {seconds:8.2f}s  {'' if ips is None else f'{ips:9.0f} img/s'}  peak {peak_mb():7.0f} MB",
              flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        prepare(cfg.dataset, cfg.seed, Path(tmp) / "dataset")
        data = load_prepared(Path(tmp) / "dataset")
        row("download", "-", time.perf_counter() - t)
        ncls = data.num_classes
        for m in methods:
            up = cfg.upstream(m)
            if up is not None and Path(up).parent.as_posix() == "data/models":
                # another method's final encoder (MLCD): the one trained earlier in this run
                cfg.methods[m] = str(Path(tmp) / "models" / Path(up).name)
            t = time.perf_counter()
            method, hist = pretrain(cfg, m, data, Path(tmp) / m / "ckpt.pt")
            save_backbone(Path(tmp) / "models" / f"{m}.pt", method, cfg, data.meta)
            dt = time.perf_counter() - t
            ips = sum(h["train_images_per_s"] for h in hist) / len(hist) if hist else None
            row("pretrain", m, dt, ips)
            t = time.perf_counter()
            tr = extract_features(method.encoder(), data.train, data.meta, dev, cfg.extract.batch_size)
            te = extract_features(method.encoder(), data.test, data.meta, dev, cfg.extract.batch_size)
            dt = time.perf_counter() - t
            row("extract", m, dt, (len(tr) + len(te)) / dt)
            t = time.perf_counter()
            w = PCAWhitening.fit(tr, cfg.whiten.pca_dim)
            wtr, wte = w.transform(tr), w.transform(te)
            row("whiten", m, time.perf_counter() - t)
            t = time.perf_counter()
            cluster_eval(wtr, data.train.y, wte, data.test.y, cfg.cluster.k or ncls, cfg.cluster.niter,
                         cfg.cluster.nredo, cfg.seed, cfg.cluster.init)
            row("cluster", m, time.perf_counter() - t)
            t = time.perf_counter()
            knn_protocols(tr, data.train.y, te, data.test.y, cfg.knn.k, cfg.knn.temperature, ncls)
            row("knn", m, time.perf_counter() - t)
            t = time.perf_counter()
            c = cfg.linear
            linear_eval(tr, data.train.y, te, data.test.y, ncls, c.epochs, c.batch_size, c.lr, c.weight_decay,
                        cfg.seed, dev)
            row("linear", m, time.perf_counter() - t)
    print(f"total {sum(r[2] for r in rows):.1f}s, peak RSS {peak_mb():.0f} MB, device {dev}")


if __name__ == "__main__":
    main()

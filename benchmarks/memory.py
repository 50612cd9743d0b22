"""Peak memory of download + one pretraining epoch + feature extraction on a generated folder of
JPEGs of different sizes, at N and at 4N images: streaming data keeps the peak flat.

    python benchmarks/memory.py [--n 500] [--method deepcluster] [--factor 4]

Each size runs in a fresh process; the peak resident set of that process and of its DataLoader
workers (the largest one: they run side by side, so the sum of the peaks bounds it from above)
is printed, and the ratio of the 4N peak to the N peak (target: at most 1.25).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(folder: str, method: str, workers: int) -> None:
    """One measured run (in its own process)."""
    import yaml

    from selfsup.core.config import load_config
    from selfsup.data.prepared import load_prepared
    from selfsup.models.features import extract_features
    from selfsup.core.io import resolve_device
    from selfsup.data.sources import prepare
    from selfsup.engine.loop import pretrain

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update(methods=[method], device="cpu", workers=workers,
               dataset={"name": "imagefolder", "path": folder, "crop_size": 32, "resize_size": 36})
    raw[method] = {**(raw.get(method) or {}), "epochs": 1}
    cfg = load_config(raw)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        prepare(cfg.dataset, cfg.seed, Path(tmp) / "dataset")
        data = load_prepared(Path(tmp) / "dataset")
        m, _ = pretrain(cfg, method, data, Path(tmp) / "ck.pt")
        dev = resolve_device(cfg.device)
        for split in (data.train, data.test):
            extract_features(m.encoder(), split, data.meta, dev, cfg.extract.batch_size, workers=workers,
                             resize=36, crop=32)
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"self_mb": self_mb, "workers_mb": kids_mb, "seconds": time.perf_counter() - t0,
                      "n_train": data.n_train}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500, help="training images of the small folder")
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--method", default="deepcluster")
    ap.add_argument("--workers", type=int, default=-1)
    ap.add_argument("--child", default="")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.method, a.workers)
        return
    from selfsup.data.synthetic import make_image_folder

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (a.n, a.factor * a.n):
            folder = make_image_folder(Path(tmp) / f"n{n}", n, n // 5, classes=5, size=(24, 96), seed=n)
            out = subprocess.run([sys.executable, __file__, "--child", str(folder), "--method", a.method,
                                  "--workers", str(a.workers)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"N={r['n_train']:6d}: peak RSS {r['self_mb']:7.0f} MB (main) + {r['workers_mb']:6.0f} MB "
                  f"(largest worker), {r['seconds']:.1f} s  [{a.method}, 1 epoch, download + extract]")
    small, big = (r["self_mb"] + r["workers_mb"] for r in rows)
    print(f"ratio {a.factor}N / N: {big / small:.3f} (target <= 1.25)")


if __name__ == "__main__":
    main()

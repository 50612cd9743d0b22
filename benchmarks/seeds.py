"""kNN-200 top-1 on the default dataset over several run seeds: the seed-to-seed spread that a
change of the numbers is compared against.

    python benchmarks/seeds.py --methods deepcluster,mlcd,instdisc,moco,invaspread --seeds 0,1,2,3
    python benchmarks/seeds.py --methods deepcluster,instdisc,moco,simclr --seeds 0 --batch-factor 2

Each seed trains the methods of params.yaml with that run seed (the data split stays seed 0), MLCD
on the DeepCluster encoder of the same seed, and prints each kNN-200 top-1 (weighted, T 0.07) and
per method the mean, std and values. It also runs from a checkout of an older commit (4120d9d,
before the engine rewrite), which is how the README's before / after figures were made.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path.cwd()))  # the checkout it is run from

try:
    from selfsup.data.sources import prepare
except ImportError:  # before the engine rewrite
    from selfsup.data.prepared import prepare
from selfsup.core.config import load_config  # noqa: E402
from selfsup.data.prepared import load_prepared  # noqa: E402
from selfsup.models.features import extract_features  # noqa: E402
from selfsup.eval.knn import knn_eval  # noqa: E402
from selfsup.models.backbones import save_backbone  # noqa: E402
from selfsup.engine.loop import pretrain  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="deepcluster,mlcd,instdisc,moco,invaspread")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--batch-factor", type=int, default=1,
                    help="multiply each method's batch_size (one process at the global batch of N processes)")
    a = ap.parse_args()
    methods, seeds = a.methods.split(","), [int(s) for s in a.seeds.split(",")]
    raw = yaml.safe_load(Path("params.yaml").read_text())
    out: dict[str, list[float]] = {m: [] for m in methods}
    cpu = torch.device("cpu")
    for seed in seeds:
        with tempfile.TemporaryDirectory() as t:
            tmp = Path(t)
            run = dict(raw, seed=seed, device="cpu")
            for m in methods:
                if a.batch_factor != 1 and "batch_size" in (raw.get(m) or {}):
                    run[m] = {**raw[m], "batch_size": raw[m]["batch_size"] * a.batch_factor}
            # MLCD clusters the DeepCluster encoder of the same seed; BEiT reads the workspace's tokenizer
            # (params.yaml's methods.beit, from `dvc repro`: its seed stays 0)
            run["methods"] = {m: str(tmp / "deepcluster.pt") if m == "mlcd" else
                              raw["methods"][m] if m == "beit" else "data/dataset" for m in methods}
            prepare(load_config({**run, "methods": ["random"]}).dataset, 0, tmp / "ds")
            data = load_prepared(tmp / "ds")
            cfg = load_config(run)
            for m in methods:
                meth, _ = pretrain(cfg, m, data, tmp / m / "ck.pt")
                if m == "deepcluster":
                    save_backbone(tmp / "deepcluster.pt", meth, cfg, data.meta)
                enc = meth.encoder() if hasattr(meth, "encoder") else meth.backbone
                tr = extract_features(enc, data.train, data.meta, cpu)
                te = extract_features(enc, data.test, data.meta, cpu)
                out[m].append(knn_eval(tr, data.train.y, te, data.test.y, 200, 0.07, 10)["top1"])
                print(f"{m} seed {seed}: {out[m][-1]:.1f}", flush=True)
    print(json.dumps({m: {"mean": round(float(np.mean(v)), 2), "std": round(float(np.std(v)), 2),
                          "values": [round(x, 1) for x in v]} for m, v in out.items()}))


if __name__ == "__main__":
    main()

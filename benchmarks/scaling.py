"""Multi-process scaling of every method's training on the current machine, and time-per-epoch
estimates for the papers' ImageNet settings.

    python benchmarks/scaling.py [--nproc 2] [--backbone smallcnn] [--size 8] [--batch 128] [--steps 16]
        [--methods a,b]
    python benchmarks/scaling.py --estimate [--bare-img-s 2500] [--gpus 8]

Measure: for each method, the engine trains a synthetic uint8 array dataset for two epochs with 1
process and with ``--nproc`` processes (launched with torchrun, as the stages are: gloo on CPUs,
NCCL on GPUs); the same per-process batch, so N processes train a global batch N times larger.
Printed: images/s of the second epoch (all processes together) and the scaling efficiency
(img/s with N / (N x img/s with 1)). On a CPU the processes share the cores (torchrun gives each
one thread), so the efficiency measures the communication and launch overheads, not speed-up.

Estimate (``--estimate``, no run): time per ImageNet epoch (1,281,167 images) of each method's
official setting on ``--gpus`` GPUs from a per-GPU throughput of a bare ResNet-50
forward + backward (``--bare-img-s``; measure it with ``bash benchmarks/gpu_check.sh``), scaled by
the method's cost per image in backbone passes (a forward is 1/3 of a forward + backward) and by a
scaling efficiency (``--efficiency``). Without a measured figure these are estimates on paper.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

METHODS = ["deepcluster", "sela", "mlcd", "instdisc", "invaspread", "moco", "simclr", "supervised"]
IMAGENET = 1_281_167
# backbone passes per image of each method's official ImageNet setting, in forward + backward units
# (a no-grad forward = 1/3): MoCo v2 query fwd+bwd + key fwd; SimCLR / InvaSpread two views fwd+bwd;
# DeepCluster / SeLa add a feature pass over the dataset per epoch (no grad), SeLa ~once per epoch
COST = {"supervised": 1.0, "instdisc": 1.0, "mlcd": 1.0, "deepcluster": 1.0 + 1 / 3, "sela": 1.0 + 1 / 3,
        "moco": 1.0 + 1 / 3, "simclr": 2.0, "invaspread": 2.0}


def worker(a: argparse.Namespace) -> None:
    import yaml

    from selfsup.core import dist
    from selfsup.core.config import load_config
    from selfsup.engine.loop import pretrain
    from throughput import bench_block, synthetic

    dist.init_from_env("auto", 300)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    data = synthetic(a.batch * a.steps * dist.world(), a.size, seed=0)
    out = {}
    for m in a.methods.split(","):
        cfg = load_config({"methods": [m], m: bench_block(raw, m, a.batch), "device": a.device,
                           "model": {"backbone": a.backbone}, "log_every": 10_000})
        with tempfile.TemporaryDirectory() as tmp:
            _, hist = pretrain(cfg, m, data, Path(tmp) / f"ck{dist.rank()}.pt")
        out[m] = hist[-1]["train_images_per_s"] * dist.world()  # every rank trains batch x steps
    if dist.is_main():
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy()


def run(nproc: int, a: argparse.Namespace) -> dict[str, float]:
    args = [str(Path(__file__).resolve()), "--worker", "--backbone", a.backbone, "--size", str(a.size), "--batch",
            str(a.batch), "--steps", str(a.steps), "--methods", a.methods, "--device", a.device]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "SELFSUP_LOG": "WARNING", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise SystemExit(f"{nproc} processes failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def estimate(a: argparse.Namespace) -> None:
    print(f"ImageNet epoch ({IMAGENET:,} images) on {a.gpus} GPUs; bare ResNet-50 fwd+bwd {a.bare_img_s:.0f} "
          f"img/s per GPU{' (measured)' if a.measured else ' (an estimate on paper: not measured here)'}, "
          f"scaling efficiency {a.efficiency}")
    print(f"{'method':<12} {'cost':>5} {'img/s':>8} {'min/epoch':>9} {'paper epochs':>12} {'days':>6}")
    # the papers' ImageNet schedules where this project has checked them (params.yaml comments);
    # "-": not checked here (SeLa, MLCD) or no ImageNet run in the paper (InvaSpread)
    epochs = {"deepcluster": 500, "instdisc": 200, "moco": 200, "simclr": 1000, "supervised": 90}
    for m in METHODS:
        ips = a.bare_img_s * a.gpus * a.efficiency / COST[m]
        minutes = IMAGENET / ips / 60
        ep = epochs.get(m)
        days = f"{minutes * ep / 1440:6.1f}" if ep else f"{'-':>6}"
        print(f"{m:<12} {COST[m]:5.2f} {ips:8.0f} {minutes:9.1f} {ep or '-':>12} {days}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--backbone", default="smallcnn")
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128, help="per process")
    ap.add_argument("--steps", type=int, default=16, help="steps per epoch")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--estimate", action="store_true")
    ap.add_argument("--bare-img-s", type=float, default=2500.0,
                    help="bare ResNet-50 fwd+bwd img/s per GPU (default: an A100-class bf16 figure, not measured)")
    ap.add_argument("--measured", action="store_true", help="--bare-img-s was measured (gpu_check.sh)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--efficiency", type=float, default=0.9)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    if a.estimate:
        estimate(a)
        return
    one, many = run(1, a), run(a.nproc, a)
    print(f"{a.backbone} at {a.size} px, batch {a.batch} per process, {a.steps} steps per epoch per process")
    print(f"{'method':<12} {'1 proc img/s':>12} {f'{a.nproc} proc img/s':>12} {'efficiency':>10}")
    for m in a.methods.split(","):
        print(f"{m:<12} {one[m]:12.0f} {many[m]:12.0f} {many[m] / (a.nproc * one[m]):10.2f}")


if __name__ == "__main__":
    main()

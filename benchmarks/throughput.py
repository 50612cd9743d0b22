"""Training throughput of every method against a bare forward + backward of the same backbone.

    python benchmarks/throughput.py [--backbone resnet18_cifar] [--size 32] [--batch 128]
        [--steps 8] [--precision fp32|bf16|fp16] [--channels-last] [--methods a,b] [--device auto]
        [--workers -1]

For each method, on the current device, with a synthetic uint8 array dataset of ``size`` px images:
- train img/s: images per second of the engine's training loop (``selfsup.engine.loop.pretrain``; the
  second of two epochs, so warm-up and the clustering / re-labelling at epoch starts are left out);
- bare img/s: a plain loop of the same backbone, forward + backward + SGD step, on already
  normalised random input of the same batch, with as many views per image as the method declares
  (images per second, not views), in the same precision and memory format;
- ratio = train / bare (targets: >= 0.8 on the 2-core CPU, >= 0.9 on a GPU);
- aug img/s batched vs per-sample: the method's declared views made from a uint8 batch by
  ``selfsup.augment.batched.make_views`` on the device, against torchvision's per-image pipeline
  (``torchvision_pipeline``) on the CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfsup.augment.batched import make_views, torchvision_pipeline  # noqa: E402
from selfsup.core.config import load_config  # noqa: E402
from selfsup.data.prepared import Data, Split  # noqa: E402
from selfsup.core.io import resolve_device  # noqa: E402
from selfsup.models.backbones import build_backbone  # noqa: E402
from selfsup.data.batches import resolve_specs  # noqa: E402
from selfsup.engine.loop import AUTOCAST, build_method, pretrain  # noqa: E402

METHODS = ["deepcluster", "sela", "mlcd", "instdisc", "invaspread", "moco", "simclr", "supervised"]


def synthetic(n: int, size: int, classes: int = 10, seed: int = 0) -> Data:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, classes, n).astype(np.int64)
    meta = {"name": "synthetic", "classes": [str(i) for i in range(classes)], "n_train": n, "n_test": 0,
            "image_size": [size, size], "channels": 3, "mean": [0.5] * 3, "std": [0.29] * 3}
    return Data(Split(x, y), Split(x[:0], y[:0]), meta)


def bench_block(raw: dict, m: str, batch: int) -> dict:
    """Method ``m``'s params block sized for a two-epoch benchmark on synthetic data: its digits
    settings, ``batch`` per process, small clustering / bank / queue sizes, no warm-up."""
    block = {**(raw.get(m) or {}), "epochs": 2, "batch_size": batch, "warmup_epochs": 0}
    for k, v in {"k": 10, "clusters": 10, "centres": 20, "pca_dim": 8, "nce_m": 64, "queue_size": 4 * batch,
                 "bn_splits": 2}.items():
        if k in block:
            block[k] = v
    return block


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bare(backbone: str, size: int, batch: int, views: int, steps: int, dev: torch.device, precision: str,
         channels_last: bool) -> float:
    net = build_backbone(backbone, 3, image_size=size).to(dev)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    head = torch.nn.Linear(net.out_dim, 128).to(dev)
    opt = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
    x = torch.randn(views * batch, 3, size, size, device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    amp = AUTOCAST[precision]
    scaler = torch.amp.GradScaler(dev.type) if precision == "fp16" else None
    t0 = 0.0
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            sync(dev)
            t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=amp) if amp else contextlib.nullcontext():
            loss = head(net(x)).float().pow(2).mean()
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    sync(dev)
    return steps * batch / (time.perf_counter() - t0)


def aug_rates(method, data: Data, size: int, batch: int, dev: torch.device) -> tuple[float, float]:
    specs = resolve_specs(method.view_specs(), size)
    x = data.train.read_batch(np.arange(batch))
    g = torch.Generator().manual_seed(0)
    make_views(x.to(dev), specs, g, data.meta["mean"], data.meta["std"])  # warm-up
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(3):
        make_views(x.to(dev), specs, g, data.meta["mean"], data.meta["std"])
    sync(dev)
    batched = 3 * batch / (time.perf_counter() - t0)
    pipes = [torchvision_pipeline(s, data.meta["mean"], data.meta["std"], image_size=size) for s in specs]
    n = min(batch, 64)
    t0 = time.perf_counter()
    for i in range(n):
        for s, p in zip(specs, pipes):
            for _ in range(s.count):
                p(x[i])
    per_sample = n / (time.perf_counter() - t0)
    return batched, per_sample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet18_cifar")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per epoch")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=-1, help="DataLoader workers (-1: in-process for arrays)")
    a = ap.parse_args()
    dev = resolve_device(a.device)
    torch.backends.cudnn.benchmark = True
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    n = a.batch * a.steps
    data = synthetic(n, a.size)
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), "
          f"{torch.get_num_threads()} threads, backbone {a.backbone} at {a.size} px, batch {a.batch}, "
          f"{a.precision}{', channels_last' if a.channels_last else ''}")
    print(f"{'method':<12} {'views':>5} {'train img/s':>11} {'bare img/s':>10} {'ratio':>6} "
          f"{'aug batched':>11} {'aug per-img':>11}")
    for m in a.methods.split(","):
        cfg = load_config({**{k: v for k, v in raw.items() if k not in METHODS + ["random"]},
                           "methods": [m], m: bench_block(raw, m, a.batch), "device": str(dev),
                           "precision": a.precision,
                           "channels_last": a.channels_last, "model": {"backbone": a.backbone},
                           "log_every": 10_000, "workers": a.workers})
        with tempfile.TemporaryDirectory() as tmp:
            method, hist = pretrain(cfg, m, data, Path(tmp) / "ck.pt")
        train = hist[-1]["train_images_per_s"]
        views = sum(s.count for s in method.view_specs())
        b = bare(a.backbone, a.size, a.batch, views, a.steps, dev, a.precision, a.channels_last)
        ab, ap_ = aug_rates(build_method(cfg, m, data).to(dev), data, a.size, a.batch, dev)
        print(f"{m:<12} {views:5d} {train:11.0f} {b:10.0f} {train / b:6.2f} {ab:11.0f} {ap_:11.0f}", flush=True)


if __name__ == "__main__":
    main()

"""Every method trained on real photos: CIFAR-10 (the JPEG archive of ../shared/datasets), a fixed
class-balanced subset, each method beside the random init of its backbone.

Why a script and not a preset: a preset is one method's recipe at its paper's scale; this runs every
method at one small CPU scale, side by side, from each method's CIFAR-10 preset shrunk the same way
(``scaled_params``). Per method it writes kNN-200 (weighted, T 0.07) and a linear probe on the frozen
features, the random-init row of the same backbone, ``diff`` (kNN minus random init's) and seconds,
then ``<out>.csv``, ``<out>.md`` and ``<out>.png`` (the kNN bars sorted, random init marked).

The shrinking (``scaled_params``), the same for every method:
- the backbone: ``smallcnn`` for the convolutional methods (their presets' ResNets cost minutes per
  epoch on a CPU); MAE and BEiT, which need a ViT, run ``vit_digits`` (2 px patches, width 64, 2
  blocks: a 16 x 16 grid at 32 px) with their digits-default decoder / vocabulary sizes, against
  ``random_vit``; BEiT's tokeniser is a VQ one trained for ``--tokenizer-epochs`` on the same images;
- ``--epochs`` epochs (the presets' 100-800), the batch capped at ``--batch`` with the lr scaled by
  the same factor where the preset's lr is for its own batch (``lr_scaling: none``), step milestones
  and warm-up scaled to the shorter schedule, queues / memory-bank negatives capped below the
  training-set size, no gradient accumulation; everything else is the preset's.

Spread: ``--spread`` methods (and the random inits) run with ``--seeds`` seeds; the report gives each
one's standard deviation over seeds and marks every method whose ``diff`` exceeds the largest of them.

Examples:
  python benchmarks/real_images.py                       # every method (about an hour on 2 CPU cores)
  python benchmarks/real_images.py --quick               # 2 methods on a tiny subset (a test runs it)
  python benchmarks/real_images.py --methods simclr,moco --epochs 5
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import shlex
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHIVE = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.xz"
VIT = "vit_digits"
VIT_METHODS = ("mae", "beit")  # the methods that need a ViT (DINO and MoCo v3 run conv nets in their CIFAR presets)
BASELINES = ("random", "random_vit")
# the digits default's architecture sizes for the ViT methods (their CIFAR presets size a ViT-B)
VIT_SIZE_KEYS = ("decoder_dim", "decoder_depth", "decoder_heads", "decoder_mlp", "vocab", "min_block")
CAPS_BELOW_N = ("queue_size", "nce_m", "nce_k", "queue_length")  # negatives drawn from the training set
# sizes tied to the presets' ResNet features: at most the smallcnn's 128 dimensions (the digits default's value)
FEATURE_CAPS = {"pca_dim": 64}
CLUSTER_KEYS = ("k", "clusters", "prototypes", "centres")
SPREAD = ("simclr", "moco", "rotnet")


def preset_for(method: str) -> str:
    """The CIFAR-10 preset a method's settings come from (``<m>_cifar10`` or the one listing it)."""
    from selfsup import presets

    names = presets.names()
    if f"{method}_cifar10" in names:
        return f"{method}_cifar10"
    for n in names:
        d = presets.load(n)
        if d["dataset"] == "cifar10" and method in d["params"]["methods"]:
            return n
    raise SystemExit(f"real_images: no CIFAR-10 preset runs {method}")


def default_methods() -> list[str]:
    """Every method of the default DAG, in its report order."""
    from selfsup import presets

    return list(presets.merged_params("digits")["methods"])


def _scale_steps(steps: list[int], old: int, new: int) -> list[int]:
    out = sorted({max(1, round(s * new / old)) for s in steps if round(s * new / old) < new})
    return out


def scaled_params(method: str, epochs: int, batch: int, n_train: int, seed: int) -> dict[str, Any]:
    """The params of ``method``'s CIFAR-10 preset shrunk to this benchmark's scale (module docstring)."""
    from selfsup import presets

    if method == "random_vit":
        p = presets.merged_params("random_cifar10")
        p["methods"] = {"random_vit": "data/dataset"}
        p["random_vit"] = {**presets.merged_params("digits").get("random_vit", {}), "backbone": VIT}
    else:
        p = presets.merged_params(preset_for(method))
    digits = presets.merged_params("digits")
    p.update(seed=seed, device="cpu", workers=0, log_every=50, checkpoint_minutes=1.0e6, precision="fp32",
             compile=False, channels_last=False)
    p["mlflow"] = {**p.get("mlflow", {}), "enabled": False}
    p["dist"] = {**p.get("dist", {}), "nproc_per_node": 1, "nnodes": 1}
    p["model"] = {**p.get("model", {}), "backbone": "smallcnn"}
    from selfsup.methods import REGISTRY

    for m in p["methods"]:
        b = dict(p.get(m) or {})
        if m in VIT_METHODS or m == "random_vit":
            b["backbone"] = VIT
            for k in VIT_SIZE_KEYS:
                if k in (digits.get(m) or {}):
                    b[k] = digits[m][k]
        elif "backbone" in b:
            b["backbone"] = ""
        if REGISTRY[m].trains:
            old_e, old_b = int(b.get("epochs", epochs)), int(b.get("batch_size", batch))
            b["epochs"] = epochs
            if old_b > batch:
                b["batch_size"] = batch
                if b.get("lr_scaling", "none") == "none" and "lr" in b:
                    b["lr"] = float(b["lr"]) * batch / old_b
            if b.get("lr_steps"):
                b["lr_steps"] = _scale_steps(list(b["lr_steps"]), old_e, epochs)
                if b.get("lr_factors"):
                    b["lr_factors"] = list(b["lr_factors"])[:len(b["lr_steps"])]
            if b.get("warmup_epochs"):
                w = min(float(b["warmup_epochs"]) * epochs / old_e, epochs / 2)
                b["warmup_epochs"] = int(round(w)) if isinstance(b["warmup_epochs"], int) else w
            for k in ("warmup_teacher_temp_epochs",):
                if b.get(k):
                    b[k] = min(int(round(b[k] * epochs / old_e)), epochs - 1)
            if "accumulate" in b:
                b["accumulate"] = 1
            for k, cap in FEATURE_CAPS.items():
                if k in b:
                    b[k] = min(b[k], cap)
            for k in CAPS_BELOW_N:
                if k in b and b[k] >= n_train // 2:
                    b[k] = max(16, n_train // 4)
            for k in CLUSTER_KEYS:  # at least 5 images a cluster (DeepCluster-v2's 3000 prototypes on 5000 images)
                if k in b:
                    b[k] = [min(v, n_train // 5) for v in b[k]] if isinstance(b[k], list) else min(b[k], n_train // 5)
            if b.get("queue_length", 0) and b["queue_length"] < b.get("batch_size", batch):
                b["queue_length"] = 0  # SwAV's queue holds whole batches: none on a tiny subset
        p[m] = b
    if any(m in VIT_METHODS for m in p["methods"]):
        p["tokenizer"] = {**digits["tokenizer"], "epochs": 1}
    p["finetune"] = {**p.get("finetune", {}), "enabled": False}
    return p


# ----------------------------------------------------------------------------- data
def cifar_subset(archive: Path, work: Path, n_train: int, n_test: int, seed: int) -> Any:
    """The first n / 10 images of each class (the archive's file order, the official batch order) of
    each split, decoded once into 32 px arrays by the download stage's own code."""
    from selfsup.core.config import load_config
    from selfsup.data.prepared import load_prepared
    from selfsup.data.sources import prepare

    if not archive.is_file():
        raise SystemExit(f"real_images: {archive} not found (--archive: the CIFAR-10 JPEG archive)")
    src = work / "cifar10-jpeg"
    if not (src / "train").is_dir():
        work.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tf:
            tf.extractall(work, filter="data")
    sub = work / f"subset-{n_train}-{n_test}"
    prepared = work / f"prepared-{n_train}-{n_test}"
    if not (prepared / "meta.json").is_file():
        for split, n in (("train", n_train), ("test", n_test)):
            for cdir in sorted((src / split).iterdir()):
                dest = sub / split / cdir.name
                dest.mkdir(parents=True, exist_ok=True)
                for f in sorted(cdir.glob("*.jpg"))[:n // 10]:
                    if not (dest / f.name).exists():
                        (dest / f.name).symlink_to(f.resolve())
        cfg = load_config({"methods": ["random"], "dataset": {"name": "imagefolder", "path": str(sub),
                                                              "image_size": 32, "download": False}},
                          parse_methods=False)
        prepare(cfg.dataset, seed, prepared)
    return load_prepared(prepared)


# ----------------------------------------------------------------------------- one run
def run_method(method: str, data: Any, args: argparse.Namespace, seed: int, work: Path,
               models: dict[str, Path]) -> dict[str, Any]:
    import torch

    from selfsup.core.config import load_config
    from selfsup.engine.loop import pretrain
    from selfsup.eval.knn import knn_eval
    from selfsup.eval.linear_probe import linear_probe
    from selfsup.models.backbones import save_backbone
    from selfsup.models.features import extract_features
    from selfsup.core.config import NO_UPSTREAM
    from selfsup.dag import TOKENS

    p = scaled_params(method, args.epochs, args.batch, data.n_train, seed)
    cfg = load_config(p, parse_methods=True)
    cpu = torch.device("cpu")
    run_dir = work / "runs" / f"{method}-s{seed}"
    t0 = time.perf_counter()
    up = cfg.methods[method]
    if up == TOKENS:
        from selfsup.models.tokenizer import make_tokenizer, save_tokenizer

        tc = dataclasses.replace(cfg.tokenizer, kind="vq", path="", epochs=args.tokenizer_epochs)
        tok, _ = make_tokenizer(data, tc, cpu, run=cfg)
        save_tokenizer(run_dir / "tokenizer.pt", tok)
        cfg = dataclasses.replace(cfg, methods={**cfg.methods, method: str(run_dir / "tokenizer.pt")})
    elif up != NO_UPSTREAM:  # MLCD: the encoder of its upstream method from this benchmark, same seed
        src = Path(up).stem
        if src not in models:
            models[src] = run_method(src, data, args, seed, work, models)["model"]
        cfg = dataclasses.replace(cfg, methods={**cfg.methods, method: str(models[src])})
    m, hist = pretrain(cfg, method, data, run_dir / "ckpt.pt")
    train_s = time.perf_counter() - t0
    model_path = run_dir / "model.pt"
    save_backbone(model_path, m, cfg, data.meta)
    models[method] = model_path
    enc = m.encoder().eval()
    tr = extract_features(enc, data.train, data.meta, cpu, 256, workers=0)
    te = extract_features(enc, data.test, data.meta, cpu, 256, workers=0)
    knn = knn_eval(tr, data.train.y, te, data.test.y, 200, 0.07, len(data.meta["classes"]))["top1"]
    lin = linear_probe(tr, data.train.y, te, data.test.y, len(data.meta["classes"]), epochs=args.linear_epochs,
                       batch_size=256, lr=0.1, weight_decay=5e-4, seed=seed, device=cpu)["top1"]
    loss = [h["loss"] for h in hist]
    return {"method": method, "seed": seed, "backbone": getattr(enc, "arch_name", "") or cfg.model.backbone,
            "knn": knn, "linear": lin, "first_loss": loss[0] if loss else math.nan,
            "last_loss": loss[-1] if loss else math.nan, "epochs": len(hist), "skipped": m.skipped,
            "seconds": time.perf_counter() - t0, "train_seconds": train_s, "model": model_path}


# ----------------------------------------------------------------------------- report
def summarise(rows: list[dict[str, Any]]) -> tuple[Any, float]:
    """(one row per method: means over its seeds, the random init of its backbone, diff; the largest
    standard deviation of kNN over seeds among the methods run with several)."""
    import pandas as pd

    df = pd.DataFrame([{k: v for k, v in r.items() if k != "model"} for r in rows])
    g = df.groupby("method", sort=False)
    out = g.agg(backbone=("backbone", "first"), knn=("knn", "mean"), linear=("linear", "mean"),
                seeds=("seed", "count"), knn_std=("knn", "std"), epochs=("epochs", "first"),
                first_loss=("first_loss", "mean"), last_loss=("last_loss", "mean"),
                seconds=("seconds", "mean"), skipped=("skipped", "first"))
    base = {"smallcnn": out.loc["random", "knn"] if "random" in out.index else math.nan,
            VIT: out.loc["random_vit", "knn"] if "random_vit" in out.index else math.nan}
    out["random_knn"] = [base.get(b, math.nan) for b in out["backbone"]]
    out["diff"] = out["knn"] - out["random_knn"]
    spread = float(out["knn_std"].dropna().max()) if out["knn_std"].notna().any() else math.nan
    out["beats_random"] = [(d > spread) if (m not in BASELINES and spread == spread) else None
                           for m, d in zip(out.index, out["diff"])]
    return out, spread


def write_report(out: Any, spread: float, rows: list[dict[str, Any]], args: argparse.Namespace, argv: list[str],
                 stem: Path, seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    stem.parent.mkdir(parents=True, exist_ok=True)
    out.round(3).to_csv(stem.with_suffix(".csv"))
    cmd = "python benchmarks/real_images.py" + ("" if not argv else " " + " ".join(shlex.quote(a) for a in argv))
    machine = (f"{platform.machine()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
               f"torch {torch.__version__}, CPU only")
    trained = out.drop(index=[m for m in BASELINES if m in out.index])
    below = [m for m, b in zip(trained.index, trained["beats_random"]) if b is False]
    lines = [
        "# Every method on real photos: CIFAR-10, a small CPU run", "",
        f"Written by `{cmd}` on {machine}; {seconds / 60:.1f} minutes in all.", "",
        f"Data: the CIFAR-10 JPEG archive, the first {args.train // 10} training and {args.test // 10} test images "
        f"of each class (32 px). Each method: its CIFAR-10 preset shrunk as `benchmarks/real_images.py` says "
        f"(smallcnn, or `{VIT}` for MAE and BEiT; {args.epochs} epochs; batch at most {args.batch}). "
        f"kNN: weighted 200-NN top-1 (T 0.07) on the frozen features; linear: a linear probe on them "
        f"({args.linear_epochs} epochs); `random_knn`: the random init of the same backbone (`random` or "
        f"`random_vit`); `diff` = kNN - random_knn.", "",
        f"Seed-to-seed spread: the largest standard deviation of kNN over {args.seeds} seeds among "
        f"{', '.join(m for m in out.index if out.loc[m, 'seeds'] > 1)}: **{spread:.2f}** points. "
        f"`beats_random`: diff above that spread.", "",
        "| method | backbone | kNN | linear | random_knn | diff | seeds | kNN std | loss first -> last | seconds | beats_random |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in out.sort_values("diff", ascending=False).iterrows():
        std = "–" if r["knn_std"] != r["knn_std"] else f"{r['knn_std']:.2f}"
        beats = "–" if r["beats_random"] is None else ("yes" if r["beats_random"] else "**no**")
        lines.append(f"| {m} | {r['backbone']} | {r['knn']:.1f} | {r['linear']:.1f} | {r['random_knn']:.1f} | "
                     f"{r['diff']:+.1f} | {r['seeds']} | {std} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} | "
                     f"{r['seconds']:.0f} | {beats} |")
    lines += ["", f"![kNN per method]({stem.name}.png)", ""]
    if below:
        lines += [f"Not above random init by more than the spread: {', '.join(below)}.", ""]
    lines += ["Per seed:", "", "| method | seed | kNN | linear | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seed']} | {r['knn']:.1f} | {r['linear']:.1f} | {r['seconds']:.0f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")

    srt = out.sort_values("knn")
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(srt) + 1.2))
    colours = ["#999999" if m in BASELINES else ("#d62728" if b is False else "#1f77b4")
               for m, b in zip(srt.index, srt["beats_random"])]
    ax.barh(list(srt.index), srt["knn"], color=colours)
    for b, style in (("smallcnn", "--"), (VIT, ":")):
        v = srt["random_knn"][srt["backbone"] == b]
        if len(v) and v.iloc[0] == v.iloc[0]:
            ax.axvline(v.iloc[0], color="k", ls=style, lw=1, label=f"random init ({b})")
    ax.set_xlabel("kNN-200 top-1 (%)")
    ax.set_title(f"CIFAR-10, {args.train} train / {args.test} test images, {args.epochs} epochs")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=80, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__[__doc__.index("The shrinking"):],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", type=Path, default=ARCHIVE, help="the CIFAR-10 JPEG archive (default: %(default)s)")
    ap.add_argument("--work", type=Path, default=ROOT / "data" / "real_images",
                    help="extraction, decoded arrays and checkpoints (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "real_images",
                    help="the report's path without suffix: .md, .csv and .png (default: %(default)s)")
    ap.add_argument("--methods", default="", help="comma-separated (default: every method of the default DAG)")
    ap.add_argument("--train", type=int, default=4000, help="training images, class-balanced (default: %(default)s)")
    ap.add_argument("--test", type=int, default=2000, help="test images, class-balanced (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=4, help="pretraining epochs per method (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=128, help="the largest batch (default: %(default)s)")
    ap.add_argument("--linear-epochs", type=int, default=30, help="linear probe epochs (default: %(default)s)")
    ap.add_argument("--tokenizer-epochs", type=int, default=1, help="BEiT's VQ tokeniser (default: %(default)s)")
    ap.add_argument("--spread", default=",".join(SPREAD),
                    help="methods also run with more seeds, for the spread (default: %(default)s)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the --spread methods and random inits (default: %(default)s)")
    ap.add_argument("--quick", action="store_true",
                    help="2 methods (simclr, rotnet) and random init on 500 / 200 images, 1 epoch, 2 seeds of simclr")
    args = ap.parse_args(argv)
    if args.quick:
        args.methods = args.methods or "simclr,rotnet"
        args.train, args.test, args.epochs, args.linear_epochs = 500, 200, 1, 10
        args.spread, args.seeds = "simclr", 2
    methods = [m for m in (args.methods.split(",") if args.methods else default_methods()) if m]
    need_vit = any(m in VIT_METHODS for m in methods)
    for base in ("random",) + (("random_vit",) if need_vit else ()):
        if base not in methods:
            methods.append(base)
    spread = [m for m in args.spread.split(",") if m in methods]
    t0 = time.perf_counter()
    data = cifar_subset(args.archive, args.work, args.train, args.test, 0)
    rows: list[dict[str, Any]] = []
    models: dict[int, dict[str, Path]] = {}  # per seed: the encoders trained so far (MLCD reads DeepCluster's)
    for m in methods:
        seeds = range(args.seeds) if (m in spread or m in BASELINES) else range(1)
        for s in seeds:
            r = run_method(m, data, args, s, args.work, models.setdefault(s, {}))
            print(f"real_images {m} seed {s}: kNN {r['knn']:.1f}, linear {r['linear']:.1f}, "
                  f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, {r['seconds']:.0f}s", flush=True)
            rows.append(r)
    out, sp = summarise(rows)
    write_report(out, sp, rows, args, argv, args.out, time.perf_counter() - t0)
    print(f"real_images: {args.out}.md / .csv / .png, {len(methods)} methods in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

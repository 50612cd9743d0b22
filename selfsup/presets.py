"""Presets: the settings of a paper's table, as an overlay on ``params.yaml``.

A preset is ``presets/<name>.yaml``: a title, the dataset, the official script or paper it follows,
the differences from it that we know of, and ``params``: the keys it sets. Mappings merge into
``params.yaml`` key by key, except ``methods``, ``knn.paper``, ``report.paper`` and
``instdisc_table1.rows``, which a preset replaces whole (it names the methods it runs, the published
numbers they meet, and empties InstDisc's Table 1 sweep unless it is InstDisc's).

    python -m selfsup.presets                 # list: name, dataset, methods, source
    python -m selfsup.presets show NAME       # the overlay
    python -m selfsup.presets apply NAME [--set key=value ...]   # write it into params.yaml
    python -m selfsup.presets smoke NAME      # a few steps of every method on a tiny stand-in

``apply`` rewrites ``params.yaml`` round-trip (comments kept), so ``dvc repro`` / ``dvc exp run``
run the preset and ``git checkout params.yaml`` returns to the digits default; ``dvc exp run
--queue`` after each ``apply`` queues several. Why not DVC's Hydra composition (the ecosystem's
preset switch): with ``hydra.enabled`` DVC regenerates ``params.yaml`` from ``conf/`` at every
``dvc exp run``, dropping the comments that document every key there, and a plain ``dvc repro``
does not compose at all; an overlay applied to the one params file keeps both commands and the
comments.

``smoke`` validates the merged config the way a stage does, then trains each method of the
preset for one epoch of two batches on a generated stand-in of the preset's data (the same image
shape, channels and classes: 32 px arrays for CIFAR-10, JPEG files of varying sizes cropped to the
preset's size for ImageNet), extracts features and runs the preset's kNN protocol. The sizes a
tiny set cannot hold (clusters, noise samples, queue) are capped (``SMOKE_CAPS``); every other key
is the preset's own.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from selfsup.config import NO_UPSTREAM, ConfigError, load_config, load_yaml
from selfsup.dag import TOKENS
from selfsup.io import repo_root

REPLACED = ("methods", "knn.paper", "report.paper", "instdisc_table1.rows", "finetune.head_layers")  # set whole by a preset, not merged
META = ("title", "dataset", "source", "differences", "params")
# smoke: sizes capped so that 16 training images and batches of 8 can hold them
SMOKE_CAPS = {"k": 4, "clusters": 4, "heads": 2, "centres": 8, "positives": 2, "nce_m": 8, "queue_size": 16,
              "pca_dim": 8, "relabel_times": 1, "bn_splits": 2, "warmup_epochs": 0, "permutations": 24, "hidden": 256,
              "prototypes": 4, "queue_length": 16, "accumulate": 1,
              "warmup_teacher_temp_epochs": 0,
              # head widths: DINO's 65536-way head (2048 hidden) made its ImageNet smokes ~25 s each on a CPU
              # (pytest tests/test_presets.py --durations=5)
              "out_dim": 4096, "hidden_dim": 1024}
SMOKE_BATCH = 8
SMOKE_SIDE = 64  # the crop of image-file stand-ins (ImageNet presets)
SMOKE_TRAIN, SMOKE_TEST = 16, 8
# the stand-in of each dataset: (image side, channels, classes); None side: image files of varying size
STAND_INS = {"cifar10": (32, 3, 10), "cifar100": (32, 3, 100), "svhn": (32, 3, 10), "stl10": (96, 3, 10),
             "digits": (8, 1, 10), "imagenet": (None, 3, 1000), "imagefolder": (None, 3, 10)}


def presets_dir() -> Path:
    return repo_root() / "presets"


def names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def load(name: str) -> dict[str, Any]:
    path = presets_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"preset {name!r}: no {path}; known: {', '.join(names())}")
    d = load_yaml(path.read_text()) or {}
    unknown = sorted(set(d) - set(META))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; known: {', '.join(META)}")
    for k in META:
        if k not in d:
            raise ConfigError(f"{path}: missing {k!r}")
    return d


def merge(base: dict[str, Any], over: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: mappings key by key, except the REPLACED keys."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(out.get(k), dict) and key not in REPLACED:
            out[k] = merge(out[k], v, key + ".")
        else:
            out[k] = copy.deepcopy(v)
    return out


def merged_params(name: str, params: str | Path | None = None) -> dict[str, Any]:
    base = load_yaml(Path(params or repo_root() / "params.yaml").read_text())
    return merge(base, load(name)["params"])


def check(name: str, params: str | Path | None = None) -> Any:
    """The preset's whole config, validated (every method block parsed), as a stage would."""
    return load_config(merged_params(name, params), parse_methods=True)


# --------------------------------------------------------------------------- apply
def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def apply(name: str, params: str | Path | None = None, sets: list[str] | None = None) -> Path:
    """Write preset ``name`` (+ ``sets``: "key=value", values in YAML) into ``params``, comments
    kept; validated first, so a bad preset leaves the file untouched."""
    from ruamel.yaml import YAML

    path = Path(params or repo_root() / "params.yaml")
    pre = load(name)
    over = copy.deepcopy(pre["params"])
    # the report states what the preset is and where it departs from the paper (data, schedule)
    over.setdefault("report", {})["notes"] = [f"Preset {name}: {pre['title']} ({pre['source']})."] + (
        [f"Differences from the paper: {' '.join(pre['differences'].split())}"] if pre["differences"] else [])
    for s in sets or []:
        if "=" not in s:
            raise ConfigError(f"--set {s!r}: expected key=value")
        k, v = s.split("=", 1)
        _set_path(over, k, load_yaml(v))
    load_config(merge(load_yaml(path.read_text()), over), parse_methods=True)
    ry = YAML()
    ry.preserve_quotes = True
    ry.width = 4096

    def yaml11_float(rep: Any, v: float) -> Any:
        # ruamel writes 1e-05; YAML 1.1 readers (PyYAML, hence load_config and DVC) take a float only
        # with a dot in the mantissa (1.0e-05), else the string '1e-05'
        t = repr(float(v))
        if "e" in t and "." not in t.split("e")[0]:
            mant, exp = t.split("e")
            t = f"{mant}.0e{exp}"
        return rep.represent_scalar("tag:yaml.org,2002:float", t)

    ry.representer.add_representer(float, yaml11_float)
    doc = ry.load(path.read_text())

    def put(node: Any, ov: dict[str, Any], prefix: str) -> None:
        for k, v in ov.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and isinstance(node.get(k), dict) and key not in REPLACED:
                put(node[k], v, key + ".")
            else:
                node[k] = v

    put(doc, over, "")
    with open(path, "w") as f:
        ry.dump(doc, f)
    if (path.parent / "dvc.yaml").is_file():  # the pretrain stage for the preset's methods (and the tokenizer stage)
        from selfsup.dag import main as regenerate

        regenerate(["--root", str(path.parent)])
    return path


# --------------------------------------------------------------------------- smoke
def smoke_params(name: str, params: str | Path | None = None) -> dict[str, Any]:
    """The preset shrunk for a CPU smoke run: one epoch, batches of 8, the SMOKE_CAPS sizes, image-file
    crops of SMOKE_SIDE px, no MLflow, one process; everything else the preset's."""
    p = merged_params(name, params)
    # fp32: a preset's fp16 is for GPUs; on a CPU its half-precision matmuls are emulated, and DINO's
    # 65536-way head took 150 s a step (tests/test_engine.py runs the fp16 and bf16 paths on a CPU)
    p.update(device="cpu", workers=0, log_every=1, checkpoint_minutes=0.0, precision="fp32")
    p["mlflow"] = {**p.get("mlflow", {}), "enabled": False}
    p["dist"] = {**p.get("dist", {}), "nproc_per_node": 1, "nnodes": 1}
    p["extract"] = {"batch_size": 16}
    d = dict(p.get("dataset") or {})
    crop = int(d.get("crop_size", 224))
    if STAND_INS.get(d.get("name"), (0,))[0] is None and crop > SMOKE_SIDE:
        # image files: the smoke's stand-in images at a 64 px crop (the eval resize in proportion): a
        # ViT-B or ResNet-50 step at 224 px costs tens of seconds on a CPU and tests no other code
        d["resize_size"] = int(round(SMOKE_SIDE * int(d.get("resize_size", 256)) / crop))
        d["crop_size"] = SMOKE_SIDE
        p["dataset"] = d
    for m in p["methods"]:
        b = dict(p.get(m) or {})
        from selfsup.methods import REGISTRY

        if REGISTRY[m].trains:  # the random baselines have no schedule
            b.update(epochs=1, batch_size=SMOKE_BATCH)
            if b.get("lr_steps"):
                b["lr_steps"], b["lr_factors"] = [], []
        for k, cap in SMOKE_CAPS.items():
            if k in b:  # a list (DeepCluster-v2's prototypes per head): each entry capped
                b[k] = [min(v, cap) for v in b[k]] if isinstance(b[k], list) else min(b[k], cap)
        p[m] = b
    return p


def _stand_in(dataset: dict[str, Any], root: Path, seed: int) -> Any:
    """A tiny generated set of the preset's data shape, loaded as the stages load theirs."""
    import numpy as np

    from selfsup.data import Data, Split, load_prepared
    from selfsup.sources import prepare
    from selfsup.synthetic import make_image_folder

    side, ch, classes = STAND_INS[dataset["name"]]
    cls = min(classes, 4)  # a few classes are enough to smoke; the head sizes follow the data
    if side is not None:
        rng = np.random.default_rng(seed)

        def split(n: int) -> Split:
            return Split(rng.integers(0, 256, (n, side, side, ch), dtype=np.uint8),
                         (np.arange(n) % cls).astype(np.int64))

        meta = {"name": f"{dataset['name']} stand-in", "classes": [str(i) for i in range(cls)],
                "n_train": SMOKE_TRAIN, "n_test": SMOKE_TEST, "image_size": [side, side], "channels": ch,
                "mean": [0.5] * ch, "std": [0.25] * ch}
        return Data(split(SMOKE_TRAIN), split(SMOKE_TEST), meta)
    crop = int(dataset.get("crop_size", 224))
    folder = make_image_folder(root / "images", SMOKE_TRAIN, SMOKE_TEST, classes=cls,
                               size=(crop, int(crop * 1.4)), seed=seed)
    cfg = load_config({"methods": ["random"], "dataset": {**{k: v for k, v in dataset.items()
                                                             if k not in ("name", "path", "root")},
                                                          "name": "imagefolder", "path": str(folder)}},
                      parse_methods=False)
    prepare(cfg.dataset, seed, root / "dataset")
    return load_prepared(root / "dataset")


def smoke(name: str, params: str | Path | None = None, workdir: str | Path | None = None) -> dict[str, Any]:
    """Run preset ``name`` for two steps per method on its stand-in; returns per-method
    {loss, steps, knn (the preset's paper protocol where it sets one, else the common kNN), seconds}."""
    import torch

    from selfsup.evaluate import knn_protocols, paper_protocol
    from selfsup.features import apply_head, extract_features
    from selfsup.models import save_backbone

    p = smoke_params(name, params)
    cfg = load_config(p, parse_methods=True)  # the preset's keys, validated as a stage would
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        data = _stand_in(p["dataset"], root, cfg.seed)
        cpu = torch.device("cpu")
        out: dict[str, Any] = {}
        models: dict[str, Path] = {}
        for m, up in cfg.methods.items():
            t0 = time.perf_counter()
            mcfg = cfg
            if up == TOKENS:  # BEiT's tokens: a tokeniser trained for an epoch on the stand-in (a dalle
                # preset's weights file is the user's: the smoke checks the rest with a vq one of its vocabulary)
                from selfsup.tokenizer import make_tokenizer, save_tokenizer

                tc = dataclasses.replace(cfg.tokenizer, kind="vq", path="", epochs=1, batch_size=SMOKE_BATCH,
                                         vocab=getattr(cfg.method(m), "vocab", cfg.tokenizer.vocab))
                tok, _ = make_tokenizer(data, tc, cpu, run=cfg)
                save_tokenizer(root / "tokenizer.pt", tok)
                mcfg = dataclasses.replace(cfg, methods={**cfg.methods, m: str(root / "tokenizer.pt")})
            elif up != NO_UPSTREAM:  # an upstream method's encoder: the one this smoke just trained
                src = Path(up).stem
                if src not in models:
                    raise ConfigError(f"methods.{m}: smoke needs the upstream {up} among the preset's methods, "
                                      f"before {m}")
                mcfg = dataclasses.replace(cfg, methods={**cfg.methods, m: str(models[src])})
            from selfsup.train import pretrain

            method, hist = pretrain(mcfg, m, data, root / m / "ckpt.pt")
            models[m] = root / "models" / f"{m}.pt"
            models[m].parent.mkdir(parents=True, exist_ok=True)
            save_backbone(models[m], method, mcfg, data.meta)
            enc = method.encoder()
            geo = {"workers": 0, "resize": cfg.dataset.resize_size, "crop": cfg.dataset.crop_size}
            tr = extract_features(enc, data.train, data.meta, cpu, 16, **geo)
            te = extract_features(enc, data.test, data.meta, cpu, 16, **geo)
            pp = cfg.knn.paper.get(m)
            spec = None
            if pp is not None:
                head = method.eval_head()
                spec = paper_protocol(f"knn.paper.{m}", pp.k, pp.temperature, pp.features,
                                      {"head": None if head is None else head.spec,
                                       "temperature": getattr(method.cfg, "temperature", None)},
                                      min(pp.pca_dim, len(tr) - 1))
                if pp.features == "head":
                    spec["features"] = (apply_head(head, tr, cpu), data.train.y, apply_head(head, te, cpu),
                                        data.test.y)
            knn = knn_protocols(tr, data.train.y, te, data.test.y, cfg.knn.k, cfg.knn.temperature,
                                len(data.meta["classes"]), paper=spec)
            loss = hist[-1]["loss"] if hist else math.nan
            if hist and not math.isfinite(loss):
                raise FloatingPointError(f"preset {name}: {m} smoke loss {loss}")
            out[m] = {"loss": loss, "epochs": len(hist), "knn": knn.get("paper_top1", knn.get("top1")),
                      "protocol": knn.get("paper_protocol", knn.get("protocol")),
                      "seconds": time.perf_counter() - t0}
        return out


# --------------------------------------------------------------------------- CLI
def listing() -> list[dict[str, str]]:
    rows = []
    for n in names():
        d = load(n)
        rows.append({"name": n, "dataset": d["dataset"], "methods": ", ".join(d["params"]["methods"]),
                     "source": d["source"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m selfsup.presets", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    for c in ("show", "smoke", "apply", "check"):
        s = sub.add_parser(c)
        s.add_argument("name")
        s.add_argument("--params", default=None, help="params file (default: the repo's params.yaml)")
        if c == "apply":
            s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args(argv)
    if a.cmd is None:
        rows = listing()
        w = {k: max(len(k), *(len(r[k]) for r in rows)) for k in ("name", "dataset", "methods")}
        print(f"{'name':<{w['name']}}  {'dataset':<{w['dataset']}}  {'methods':<{w['methods']}}  source")
        for r in rows:
            print(f"{r['name']:<{w['name']}}  {r['dataset']:<{w['dataset']}}  {r['methods']:<{w['methods']}}  "
                  f"{r['source']}")
        return 0
    if a.cmd == "show":
        print(yaml.safe_dump(load(a.name), sort_keys=False, width=100))
    elif a.cmd == "check":
        check(a.name, a.params)
        print(f"preset {a.name}: ok")
    elif a.cmd == "apply":
        path = apply(a.name, a.params, a.set)
        print(f"{path}: preset {a.name} applied (git checkout {path.name} restores the default)")
    elif a.cmd == "smoke":
        t0 = time.perf_counter()
        for m, r in smoke(a.name, a.params).items():
            print(f"{a.name} {m}: loss {r['loss']:.4f}, kNN {r['knn']:.1f} ({r['protocol']}), {r['seconds']:.1f}s")
        print(f"smoke {a.name}: ok in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

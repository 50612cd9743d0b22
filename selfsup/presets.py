"""Presets: the settings of a paper's table, on the typed defaults, with a ledger against the official recipe.

A preset is ``presets/<name>.yaml``: a title, the dataset, the official script or paper it follows,
``sources`` (named public texts: a repository at a commit and a path, or a paper's section / table),
``recipe`` (the ledger: one row per official setting, ``{key, official, source[, declared]}``) and
``params``: the keys it sets. Its effective config is every key's typed default, then ``params``
(mappings merged key by key, except the REPLACED keys, which a preset sets whole: the methods it runs,
the published numbers they meet, InstDisc's Table 1 sweep). The digits default is the preset
``digits``, whose params block is the template of ``params.yaml`` (its keys and comments).

    python -m selfsup.presets                 # list: name, dataset, methods, source
    python -m selfsup.presets show NAME [--effective]   # the overlay (or every key in effect)
    python -m selfsup.presets diff NAME | --all [--json]  # the ledger: ours | official | source | verdict
    python -m selfsup.presets apply NAME [--set key=value ...]   # write params.yaml from it
    python -m selfsup.presets smoke NAME      # a few steps of every method on a tiny stand-in

``apply`` writes the template with the preset's effective values (``render``), so the file depends on
the preset (and ``--set``) alone: applying A then B gives the file B alone gives, comments kept, and
``apply digits`` restores the default. ``dvc repro`` / ``dvc exp run`` then run the preset; ``dvc exp
run --queue`` after each ``apply`` queues several. Why not DVC's Hydra composition (the ecosystem's
preset switch): with ``hydra.enabled`` DVC regenerates ``params.yaml`` from ``conf/`` at every ``dvc exp
run``, dropping the comments that document every key there, and a plain ``dvc repro`` does not compose
at all; one params file written from the preset keeps both commands and the comments.

``diff`` compares each ledger row's official value with the effective config: ``same``, ``declared:
<reason>``, ``UNDECLARED`` (differs, no reason) or ``STALE`` (a reason, but equal); it exits non-zero on
the last two or when fewer than MIN_ROWS settings are compared. The report's note on a preset's
differences is generated from its declared rows.

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
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from selfsup.core.config import NO_UPSTREAM, ConfigError, load_config, load_yaml
from selfsup.dag import TOKENS
from selfsup.core.io import repo_root

REPLACED = ("methods", "knn.paper", "report.paper", "instdisc_table1.rows", "finetune.head_layers")  # set whole by a preset, not merged
META = ("title", "dataset", "source", "sources", "recipe", "params")
DEFAULT = "digits"  # the preset params.yaml is written from in the repository (its params block: the comments)
ROW_KEYS = ("key", "official", "source", "declared")
MIN_ROWS = 10  # a preset's ledger compares at least this many settings
ABSENT = "(no such setting)"  # ours, for an official setting this project has no key for
# smoke: sizes capped so that 16 training images and batches of 8 can hold them
SMOKE_CAPS = {"k": 4, "clusters": 4, "heads": 2, "centres": 8, "positives": 2, "nce_m": 8, "nce_k": 8, "queue_size": 16,
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
    if not isinstance(d["recipe"], list) or not isinstance(d["sources"], dict):
        raise ConfigError(f"{path}: recipe is a list of rows and sources a mapping")
    for i, row in enumerate(d["recipe"]):
        bad = sorted(set(row) - set(ROW_KEYS)) if isinstance(row, dict) else ["(not a mapping)"]
        if bad or not all(k in row for k in ("key", "official", "source")):
            raise ConfigError(f"{path}: recipe[{i}]: a row is {{key, official, source[, declared]}}, got {row!r}")
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


def typed_defaults() -> dict[str, Any]:
    """Every key of params.yaml at its typed default: the sections of ``selfsup.core.config.SECTIONS`` and
    every method's config class (what a key left out of params.yaml means)."""
    from selfsup.core.config import Config, method_class, method_names

    d = Config().to_dict()  # every section typed at its defaults
    for m in method_names():
        d[m] = dataclasses.asdict(method_class(m).Config())
    return d


def overlay(name: str, sets: list[str] | None = None) -> dict[str, Any]:
    """The keys preset ``name`` sets, plus ``sets`` ("key=value", values in YAML), plus the report
    notes that say what the preset is and where it departs from the official recipe."""
    pre = load(name)
    over = copy.deepcopy(pre["params"])
    notes = [f"Preset {name}: {pre['title']} ({pre['source']})."]
    diffs = differences(name)
    if diffs:
        notes.append(f"Differences from the official recipe: {diffs}")
    if name != DEFAULT:
        over.setdefault("report", {})["notes"] = notes
    for s in sets or []:
        if "=" not in s:
            raise ConfigError(f"--set {s!r}: expected key=value")
        k, v = s.split("=", 1)
        _set_path(over, k, load_yaml(v))
    return over


def effective(name: str, sets: list[str] | None = None) -> dict[str, Any]:
    """Preset ``name``'s whole config: the typed defaults of every key, then the preset (the same
    whatever params.yaml held before)."""
    return merge(typed_defaults(), overlay(name, sets))


def merged_params(name: str) -> dict[str, Any]:
    """The params a stage reads after ``apply name``: the keys of the written file."""
    return load_yaml(render(name))


def check(name: str) -> Any:
    """The preset's whole config, validated (every method block parsed), as a stage would."""
    return load_config(merged_params(name), parse_methods=True)


# --------------------------------------------------------------------------- the recipe ledger
def _lookup(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return ABSENT
        d = d[part]
    return d


def same_value(a: Any, b: Any) -> bool:
    """Settings equal as values: numbers within float rounding (1.0e-4 == 0.0001, 30 == 30.0), bools
    only as bools, lists and mappings item by item."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(same_value(a[k], b[k]) for k in a)
    return a == b


@dataclasses.dataclass
class LedgerRow:
    key: str
    ours: Any
    official: Any
    source: str
    status: str  # same | declared | UNDECLARED | STALE (declared, but ours equals the official value)
    reason: str = ""

    def verdict(self) -> str:
        return f"declared: {self.reason}" if self.status == "declared" else self.status


def ledger(name: str) -> list[LedgerRow]:
    """Preset ``name``'s recipe ledger: per official setting, our effective value beside it."""
    pre = load(name)
    eff = merge(typed_defaults(), pre["params"])  # the notes apply adds are not settings
    rows = []
    for r in pre["recipe"]:
        ours = _lookup(eff, str(r["key"]))
        src = expand_source(str(r["source"]), pre["sources"])
        same = ours is not ABSENT and same_value(ours, r["official"])
        reason = " ".join(str(r.get("declared") or "").split())
        status = ("STALE" if reason else "same") if same else ("declared" if reason else "UNDECLARED")
        rows.append(LedgerRow(str(r["key"]), ours, r["official"], str(src), status, reason))
    return rows


def expand_source(text: str, sources: dict[str, str]) -> str:
    """A row's source with the preset's source ids spelled out: each ``;``-separated part that starts
    with an id (``code``, ``code (--lr 0.03)``) becomes that source's text plus the rest."""
    parts = []
    for part in text.split(";"):
        m = re.match(r"\s*([\w-]+)(.*)$", part, re.S)
        parts.append(f"{sources[m.group(1)]}{m.group(2)}" if m and m.group(1) in sources else part.strip())
    return "; ".join(p.strip() for p in parts)


def counts(rows: list[LedgerRow]) -> dict[str, int]:
    return {"same": sum(r.status == "same" for r in rows), "declared": sum(r.status == "declared" for r in rows),
            "undeclared": sum(r.status in ("UNDECLARED", "STALE") for r in rows)}


def differences(name: str) -> str:
    """The preset's differences from the official recipe, generated from its declared ledger rows."""
    return " ".join(f"{r.key}: ours {_fmt(r.ours)}, official {_fmt(r.official)} ({r.reason})."
                    for r in ledger(name) if r.status == "declared")


def _fmt(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def ledger_problems(name: str) -> list[str]:
    rows = ledger(name)
    out = [f"{name}: {r.key}: {r.verdict()} (ours {_fmt(r.ours)}, official {_fmt(r.official)})"
           for r in rows if r.status in ("UNDECLARED", "STALE")]
    if len(rows) < MIN_ROWS:
        out.append(f"{name}: the ledger compares {len(rows)} settings, fewer than {MIN_ROWS}: incomplete")
    return out


def print_ledger(name: str) -> None:
    rows = ledger(name)
    print(f"# {name}: {load(name)['title']}")
    w = max(len(r.key) for r in rows) if rows else 3
    for r in rows:
        print(f"{r.key:<{w}}  ours {_fmt(r.ours)} | official {_fmt(r.official)} | {r.source} | {r.verdict()}")


# --------------------------------------------------------------------------- apply
def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def template_text() -> str:
    """The params block of the default preset, unindented: params.yaml's keys and comments."""
    lines = (presets_dir() / f"{DEFAULT}.yaml").read_text().splitlines(True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == "params:"), None)
    if start is None:
        raise ConfigError(f"presets/{DEFAULT}.yaml: no 'params:' line (the template of params.yaml)")
    body = lines[start + 1:]
    if any(ln.strip() and not ln.startswith("  ") for ln in body):
        raise ConfigError(f"presets/{DEFAULT}.yaml: params must be the last key (its block indented by two)")
    return "".join(ln[2:] if ln.strip() else "\n" for ln in body)


HEADER = """# selfsup pipeline parameters, written by `python -m selfsup.presets apply {name}`{sets}.
# The keys and comments come from presets/{default}.yaml, the values from the preset; a key left out
# has its typed default (its section's schema, listed in SECTIONS of selfsup/core/config.py, or its
# method's file selfsup/methods/<name>.py). Every key is validated before any work starts. Edit freely
# or sweep with `dvc exp run -S key=value`; `apply NAME` rewrites this file from the preset alone, and
# `apply {default}` restores the default.
"""


def _yaml() -> Any:
    from ruamel.yaml import YAML

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
    return ry


def _styled(old: Any, new: Any) -> Any:
    """``new`` as a node in ``old``'s flow / block style (a flow list stays ``[a, b]``)."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    flow = getattr(getattr(old, "fa", None), "flow_style", lambda: None)()
    if isinstance(new, dict):
        node = CommentedMap((k, _styled(None, v)) for k, v in new.items())
    elif isinstance(new, list):
        node = CommentedSeq(_styled(None, v) for v in new)
    else:
        return new
    if flow or (flow is None and isinstance(new, list) and not any(isinstance(v, (dict, list)) for v in new)):
        node.fa.set_flow_style()
    return node


def render(name: str, sets: list[str] | None = None) -> str:
    """params.yaml for preset ``name``: the default preset's keys and comments with the preset's effective
    values, then the preset's keys the template lacks. A function of the preset (and ``sets``) alone."""
    ry = _yaml()
    doc = ry.load(template_text())
    over = overlay(name, sets)
    eff = merge(typed_defaults(), over)  # effective(name, sets), the overlay built once

    def put(node: Any, want: dict[str, Any], extra: dict[str, Any], prefix: str) -> None:
        for k in list(node):
            key, v = f"{prefix}{k}", want.get(k, ABSENT)
            if v is ABSENT:
                raise ConfigError(f"presets/{DEFAULT}.yaml: {key}: not a setting")
            if isinstance(v, dict) and isinstance(node[k], dict) and key not in REPLACED:
                put(node[k], v, extra.get(k) or {}, key + ".")
            elif not same_value(_plain(node[k]), v):
                node[k] = _styled(node[k], v)
        for k, v in extra.items():  # the preset's keys the template has no line for
            if k not in node:
                node[k] = _styled(None, want[k] if not isinstance(v, dict) or f"{prefix}{k}" in REPLACED
                                  else {kk: want[k][kk] for kk in v})

    put(doc, eff, over, "")
    import io

    buf = io.StringIO()
    ry.dump(doc, buf)
    tail = "".join(f" --set {s}" for s in sets or [])
    return HEADER.format(name=name, sets=tail, default=DEFAULT) + buf.getvalue()


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def apply(name: str, params: str | Path | None = None, sets: list[str] | None = None) -> Path:
    """Write preset ``name`` (+ ``sets``: "key=value", values in YAML) as ``params``: the default
    preset's keys and comments with this preset's values (``render``). Validated first, so a bad preset
    leaves the file untouched; the result does not depend on what the file held."""
    path = Path(params or repo_root() / "params.yaml")
    text = render(name, sets)
    load_config(load_yaml(text), parse_methods=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    if (path.parent / "dvc.yaml").is_file():  # the pretrain stage for the preset's methods (and the tokenizer stage)
        from selfsup.dag import main as regenerate

        regenerate(["--root", str(path.parent)])
    return path


# --------------------------------------------------------------------------- smoke
def smoke_params(name: str) -> dict[str, Any]:
    """The preset shrunk for a CPU smoke run: one epoch, batches of 8, the SMOKE_CAPS sizes, image-file
    crops of SMOKE_SIDE px, no MLflow, one process; everything else the preset's."""
    p = merged_params(name)
    # fp32: a preset's fp16 is for GPUs; on a CPU its half-precision matmuls are emulated, and DINO's
    # 65536-way head took 150 s a step (tests/test_engine.py runs the fp16 and bf16 paths on a CPU)
    # checkpoint_minutes: the epoch-end checkpoint only (the mid-epoch one of a ViT-B with its AdamW state
    # is a gigabyte written; tests/test_contrastive.py and the other resume tests kill runs mid-epoch)
    p.update(device="cpu", workers=0, log_every=1, checkpoint_minutes=1.0e6, precision="fp32")
    p["mlflow"] = {**p.get("mlflow", {}), "enabled": False}
    p["dist"] = {**p.get("dist", {}), "nproc_per_node": 1, "nnodes": 1}
    p["extract"] = {"batch_size": 16}
    # the evaluation protocols the preset selects, run for one epoch of batches of 8 (smoke runs them all)
    p["linear"] = {**p.get("linear", {}), "epochs": 1, "batch_size": SMOKE_BATCH, "lr_steps": []}
    p["probe"] = {**p.get("probe", {}), "epochs": 1, "batch_size": SMOKE_BATCH, "max_train": 0}
    p["finetune"] = {**p.get("finetune", {}), "epochs": 1, "batch_size": SMOKE_BATCH, "warmup_epochs": 0,
                     "precision": "fp32"}  # fp32 as the pretraining above: fp16 is for GPUs
    for sec in ("linear", "finetune"):
        if "warmup_epochs" in p[sec]:
            p[sec]["warmup_epochs"] = 0
        if "accumulate" in p[sec]:
            p[sec]["accumulate"] = 1
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
        _shrink_grid(b)
        p[m] = b
    return p


def _shrink_grid(block: dict[str, Any]) -> None:
    """A patch grid (CPC's ``view_size`` / ``patch`` / ``stride``) on views larger than SMOKE_SIDE: the
    same grid at SMOKE_SIDE px when the sizes divide evenly (CPC's 7 x 7 grid of 64 px patches over 256
    px becomes 16 px over 64 px: at full size its 49 ResNet-50 patches of 64 px took 9 s a step on a CPU,
    ``python -m selfsup.presets smoke cpc_imagenet`` before this shrinking)."""
    view, patch, stride = (int(block.get(k) or 0) for k in ("view_size", "patch", "stride"))
    if view > SMOKE_SIDE and patch and stride and view % SMOKE_SIDE == 0:
        r = view // SMOKE_SIDE
        if patch % r == 0 and stride % r == 0:
            block.update(view_size=SMOKE_SIDE, patch=patch // r, stride=stride // r)


def _stand_in(dataset: dict[str, Any], folder: Path, seed: int) -> Any:
    """A tiny generated set of the preset's data shape, written to ``folder`` in the download stage's
    format and loaded as the stages load theirs (the evaluation steps read it back from there)."""
    import numpy as np

    from selfsup.data.prepared import load_prepared
    from selfsup.core.io import write_json
    from selfsup.data.sources import prepare
    from selfsup.data.synthetic import make_image_folder

    side, ch, classes = STAND_INS[dataset["name"]]
    cls = min(classes, 4)  # a few classes are enough to smoke; the head sizes follow the data
    if side is not None:
        rng = np.random.default_rng(seed)
        folder.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", SMOKE_TRAIN), ("test", SMOKE_TEST)):
            np.save(folder / f"{split}_x.npy", rng.integers(0, 256, (n, side, side, ch), dtype=np.uint8))
            np.save(folder / f"{split}_y.npy", (np.arange(n) % cls).astype(np.int64))
        write_json(folder / "meta.json", {
            "name": f"{dataset['name']} stand-in", "format": "array", "classes": [str(i) for i in range(cls)],
            "n_train": SMOKE_TRAIN, "n_test": SMOKE_TEST, "image_size": [side, side], "channels": ch,
            "mean": [0.5] * ch, "std": [0.25] * ch})
        return load_prepared(folder)
    crop = int(dataset.get("crop_size", 224))
    images = make_image_folder(folder.parent / "images", SMOKE_TRAIN, SMOKE_TEST, classes=cls,
                               size=(crop, int(crop * 1.4)), seed=seed)
    cfg = load_config({"methods": ["random"], "dataset": {**{k: v for k, v in dataset.items()
                                                             if k not in ("name", "path", "root")},
                                                          "name": "imagefolder", "path": str(images)}},
                      parse_methods=False)
    prepare(cfg.dataset, seed, folder)
    return load_prepared(folder)


def smoke(name: str, workdir: str | Path | None = None) -> dict[str, Any]:
    """Run preset ``name`` for two steps per method on its stand-in, then the evaluations it selects (the kNN
    protocols, its linear protocol, the SVM, the per-layer probes and fine-tuning when on) for one epoch each,
    as the evaluate stage runs them; returns per-method {loss, epochs, knn (the preset's paper protocol where
    it sets one, else the common kNN), protocol, linear, linear_protocol, probes, finetune, seconds}."""
    import torch

    from selfsup.eval.protocols import knn_protocols, paper_protocol
    from selfsup.models.features import apply_head, extract_features
    from selfsup.eval.evaluate_all import finetune_step, linear_step
    from selfsup.models.backbones import save_backbone
    from selfsup.core.stage import Paths

    p = smoke_params(name)
    cfg = load_config(p, parse_methods=True)  # the preset's keys, validated as a stage would
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        P = Paths(root)
        data = _stand_in(p["dataset"], P.dataset, cfg.seed)
        cpu = torch.device("cpu")
        out: dict[str, Any] = {}
        models: dict[str, Path] = {}
        for m, up in cfg.methods.items():
            t0 = time.perf_counter()
            mcfg = cfg
            if up == TOKENS:  # BEiT's tokens: a tokeniser trained for an epoch on the stand-in (a dalle
                # preset's weights file is the user's: the smoke checks the rest with a vq one of its vocabulary)
                from selfsup.models.tokenizer import make_tokenizer, save_tokenizer

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
            from selfsup.engine.loop import pretrain

            method, hist = pretrain(mcfg, m, data, root / m / "ckpt.pt")
            models[m] = P.model(m)
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
            ncls = len(data.meta["classes"])
            lin = linear_step(mcfg, m, P, tr, data.train.y, te, data.test.y, ncls, cpu)
            ft = finetune_step(mcfg, m, P, data.train.y, data.test.y, cpu)
            out[m] = {"loss": loss, "epochs": len(hist), "knn": knn.get("paper_top1", knn.get("top1")),
                      "protocol": knn.get("paper_protocol", knn.get("protocol")),
                      "linear": lin["top1"], "linear_protocol": cfg.linear.protocol,
                      "probes": sorted((lin.get("probes") or {}).get("layers", {})),
                      "finetune": ft.get("top1"), "seconds": time.perf_counter() - t0}
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
        if c == "apply":
            s.add_argument("--params", default=None, help="the file to write (default: the repo's params.yaml)")
            s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        if c == "show":
            s.add_argument("--effective", action="store_true", help="every key: the typed defaults, then the preset")
    d = sub.add_parser("diff", help="the recipe ledger: ours | official | source | same / declared / UNDECLARED")
    d.add_argument("name", nargs="?")
    d.add_argument("--all", action="store_true", help="every preset")
    d.add_argument("--json", action="store_true", help="per preset, the counts of same / declared / undeclared")
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
        print(yaml.safe_dump(effective(a.name) if a.effective else load(a.name), sort_keys=False, width=100))
    elif a.cmd == "check":
        check(a.name)
        print(f"preset {a.name}: ok")
    elif a.cmd == "apply":
        path = apply(a.name, a.params, a.set)
        print(f"{path}: preset {a.name} applied (`python -m selfsup.presets apply {DEFAULT}` restores the default)")
    elif a.cmd == "smoke":
        t0 = time.perf_counter()
        for m, r in smoke(a.name).items():
            print(f"{a.name} {m}: loss {r['loss']:.4f}, kNN {r['knn']:.1f} ({r['protocol']}), linear "
                  f"{r['linear']:.1f} ({r['linear_protocol']})"
                  + (f", probes {', '.join(r['probes'])}" if r["probes"] else "")
                  + ("" if r["finetune"] is None else f", fine-tuned {r['finetune']:.1f}") + f", {r['seconds']:.1f}s")
        print(f"smoke {a.name}: ok in {time.perf_counter() - t0:.1f}s")
    elif a.cmd == "diff":
        if bool(a.all) == bool(a.name):
            ap.error("diff: name a preset or pass --all")
        todo = names() if a.all else [a.name]
        problems = [p for n in todo for p in ledger_problems(n)]
        if a.json:
            print(json.dumps({n: {**counts(ledger(n)), "compared": len(ledger(n))} for n in todo}, indent=1))
        else:
            for n in todo:
                print_ledger(n)
                print()
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

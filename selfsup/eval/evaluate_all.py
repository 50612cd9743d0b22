"""Every evaluation of the frozen encoders, in one process: the ``evaluate`` stage runs ``evaluate_all``
(every method, reusing a method's metrics while its model and the evaluation keys are unchanged), which
runs these steps per method.

1. features of the train and test splits (eval mode, eval transform; with several processes each
   rank extracts its share) and of the method's saved eval head, written for the user and the report;
2. weighted kNN at each ``knn.k`` (and the method's paper protocol, ``knn.paper.<m>``);
3. PCA-whitening fitted on train + L2, then k-means on the whitened features: NMI, ARI, Hungarian
   accuracy (the DeepCluster evaluation);
4. the linear probe (frozen features, MoCo's augmented protocol, or MAE's / DINO's / BEiT's ViT
   protocols: ``selfsup.eval.vit_linear``), the linear SVM and the per-layer probes;
5. end-to-end fine-tuning of a copy of the encoder with a linear classifier (``selfsup.eval.finetune``:
   BEiT / MAE's recipe, layer-wise lr decay for ViTs), the protocol masked image modelling is judged by.

Why one stage and not five per method, nor one per method: each DVC stage start imports torch and the
libraries and updates its ``dvc.lock``, about 4 s on the 2-core CPU, more than the steps themselves cost
on digits (``metrics/*/<m>.json: seconds``), and the default DAG must fit its 10-minute budget. The
steps keep their own metrics files (``metrics/{extract,knn,cluster,linear,finetune}/<m>.json``); what
is lost is that a sweep of one step's params (``-S knn.k=...``) re-runs the others too (a few seconds
per method on digits; on ImageNet the extraction dominates and the features are written once either way).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import numpy as np
import torch

from selfsup.core import dist
from selfsup.core.config import Config, ConfigError, config_hash
from selfsup.data.prepared import load_prepared
from selfsup.eval.protocols import _skip, cluster_eval, knn_protocols, linear_eval, no_labels, paper_protocol, svm_eval
from selfsup.models.features import apply_head, extract_sharded
from selfsup.models.heads import hidden_layers
from selfsup.core.io import ResultCache, derive_seed, read_features, read_json, sha256_file, write_features, write_json
from selfsup.models.backbones import load_backbone, load_eval_head
from selfsup.cluster.pca import PCAWhitening
from selfsup.core.stage import Paths

log = logging.getLogger("selfsup.eval.evaluate_all")
UNLABELLED_K = 10  # cluster.k 0 on data without classes (documented in params.yaml)


def extract_all(cfg: Config, name: str, P: Paths, device: torch.device) -> dict[str, Any] | None:
    """Step 1: writes ``data/features/<name>/{train,test}[_head].parquet`` and ``protocol.json``;
    returns the extraction metrics on rank 0, None on the other ranks (they are done)."""
    data = load_prepared(P.dataset)
    net = load_backbone(P.model(name), device)
    head, temperature = load_eval_head(P.model(name), device)
    t0 = time.perf_counter()
    n, dim = 0, 0
    for split in ("train", "test"):
        s = getattr(data, split)
        feats = extract_sharded(net, s, data.meta, device, cfg.extract.batch_size, desc=f"extract {name} {split}",
                                workers=cfg.workers, resize=cfg.dataset.resize_size, crop=cfg.dataset.crop_size)
        if dist.is_main():
            write_features(P.features(name, split), feats, s.y)  # (N, D)
            if head is not None:
                write_features(P.features(name, f"head_{split}"), apply_head(head, feats, device), s.y)
        n, dim = n + len(feats), int(feats.shape[1])
    if not dist.is_main():
        return None
    dt = time.perf_counter() - t0
    write_json(P.features(name, "train").parent / "protocol.json",
               {"head": None if head is None else head.spec, "temperature": temperature})
    return {"seconds": dt, "images_per_s": n / dt, "dim": dim}


def knn_step(cfg: Config, name: str, P: Paths, tr: np.ndarray, ytr: np.ndarray, te: np.ndarray, yte: np.ndarray,
             num_classes: int) -> dict[str, Any]:
    """Step 2: weighted kNN (cosine, exp(sim / T) votes) at each k, and the method's paper protocol
    (on the backbone or its eval head's features, at a set or its training temperature)."""
    t0 = time.perf_counter()
    paper = cfg.knn.paper.get(name)
    spec = None
    if paper is not None:
        spec = paper_protocol(f"knn.paper.{name}", paper.k, paper.temperature, paper.features,
                              read_json(P.features(name, "train").parent / "protocol.json"), paper.pca_dim)
        if paper.features == "head":
            spec["features"] = (*read_features(P.features(name, "head_train")),
                                *read_features(P.features(name, "head_test")))
    out = knn_protocols(tr, ytr, te, yte, ks=cfg.knn.k, temperature=cfg.knn.temperature,
                        num_classes=num_classes, paper=spec)
    return {**out, "seconds": time.perf_counter() - t0}


def cluster_k(cfg: Config, num_classes: int, n: int) -> int:
    """``cluster.k``; 0: the number of classes, or ``UNLABELLED_K`` (at most one per training image)
    for data without classes (an unlabelled folder: only the k-means objective is reported)."""
    if cfg.cluster.k:
        if cfg.cluster.k > n:
            raise ConfigError(f"cluster.k: {cfg.cluster.k} clusters but only {n} training images")
        return cfg.cluster.k
    return num_classes or min(UNLABELLED_K, n)


def cluster_step(cfg: Config, tr: np.ndarray, ytr: np.ndarray, te: np.ndarray, yte: np.ndarray,
                 num_classes: int, quiet: bool = False) -> dict[str, Any]:
    """Step 3: PCA-whitening (faiss, fitted on train) + L2, then k-means (faiss) on the whitened train
    features, its assignment of test: NMI, ARI, Hungarian accuracy (``quiet``: without labels, the
    caller has said why those skip). ``whiten.pca_dim`` is capped at the features' rank (a warning)."""
    t0 = time.perf_counter()
    try:
        pca = PCAWhitening.fit(tr, cfg.whiten.pca_dim, key="whiten.pca_dim")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    wtr, wte = pca.transform(tr), pca.transform(te)  # (N, pca_dim), L2-normalised
    whiten_s = time.perf_counter() - t0
    out = cluster_eval(wtr, ytr, wte, yte, k=cluster_k(cfg, num_classes, len(tr)), niter=cfg.cluster.niter,
                       nredo=cfg.cluster.nredo, seed=cfg.seed, init=cfg.cluster.init, quiet=quiet)
    return {**out, "pca_dim": pca.dim, "whiten_seconds": whiten_s, "seconds": time.perf_counter() - t0}


def linear_step(cfg: Config, name: str, P: Paths, tr: np.ndarray, ytr: np.ndarray, te: np.ndarray,
                yte: np.ndarray, num_classes: int, device: torch.device) -> dict[str, Any]:
    """Step 4: the linear probe on frozen features (fixed schedule, test top-1 at the end), MoCo's
    augmented protocol or a paper's ViT protocol (``linear.protocol``), the linear SVM, and the per-layer
    probes when ``probe.layers`` asks for them."""
    from selfsup.engine.schedules import lr_scale

    t0 = time.perf_counter()
    c = cfg.linear
    if c.protocol != "frozen" or cfg.probe.layers:  # these read the encoder again, on the dataset
        net, data = load_backbone(P.model(name), device), load_prepared(P.dataset)
    if c.protocol == "frozen":
        out = linear_eval(tr, ytr, te, yte, num_classes=num_classes, epochs=c.epochs, batch_size=c.batch_size,
                          lr=c.lr * lr_scale(c.lr_scaling, c.batch_size, 256), weight_decay=c.weight_decay,
                          seed=derive_seed(cfg.seed, "linear", name), device=device)
    elif c.protocol == "augmented":  # MoCo's protocol: augmented views through the frozen encoder every epoch
        from selfsup.eval.augmented_linear import augmented_linear_probe

        out = augmented_linear_probe(net, data, cfg, te, yte, device, derive_seed(cfg.seed, "linear", name))
    else:  # the papers' ViT protocols (mae, dino, beit): crops through the frozen encoder every epoch
        from selfsup.eval.vit_linear import paper_linear_probe

        out = paper_linear_probe(net, data, cfg, device, derive_seed(cfg.seed, "linear", name))
    if cfg.svm.enabled:
        out.update(svm_eval(tr, ytr, te, yte, cfg.svm.c, derive_seed(cfg.seed, "svm", name)))
    if cfg.probe.layers:
        from selfsup.eval.layer_probes import probe_all
        from selfsup.data.batches import batch_maker

        out["probes"] = probe_all(net, data, device, cfg.probe, derive_seed(cfg.seed, "probe", name),
                                  workers=cfg.workers, resize=cfg.dataset.resize_size, crop=cfg.dataset.crop_size,
                                  batch_size=cfg.extract.batch_size, make=batch_maker(cfg, data, device))
    return {**out, "seconds": time.perf_counter() - t0}


def finetune_step(cfg: Config, name: str, P: Paths, ytr: np.ndarray, yte: np.ndarray, device: torch.device
                  ) -> dict[str, Any]:
    """Step 5: end-to-end fine-tuning (``selfsup.eval.finetune``) of the encoder as loaded from its file."""
    from selfsup.eval.finetune import finetune

    if not cfg.finetune.enabled:
        return {"skipped": "finetune: skipped, finetune.enabled is false"}
    if (s := _skip("finetune", ytr, yte)) is not None:
        return s
    t0 = time.perf_counter()
    head = None
    if k := cfg.finetune.head_layers.get(name, 0):  # SimCLR v2: fine-tuned from the projection head's k-th layer
        saved, _ = load_eval_head(P.model(name), device)
        proj = getattr(saved, "proj", None)
        if proj is None:
            raise ConfigError(f"finetune.head_layers.{name}: {P.model(name)} holds no projection head")
        try:
            head = hidden_layers(proj, k, f"finetune.head_layers.{name}")
        except ValueError as e:
            raise ConfigError(str(e)) from e
    out = finetune(load_backbone(P.model(name), device), load_prepared(P.dataset), cfg, device,
                   derive_seed(cfg.seed, "finetune", name), head)
    return {**out, "seconds": time.perf_counter() - t0}


def evaluate_features(cfg: Config, name: str, P: Paths, device: torch.device, extract: dict[str, Any]
                      ) -> dict[str, dict[str, Any]]:
    """Steps 2-5 on the features step 1 wrote (rank 0). Without labels (a split with none) only the
    clustering runs (its objective), after one line saying so: the label-based steps do no work."""
    num_classes = len(read_json(P.dataset / "meta.json")["classes"])
    tr, ytr = read_features(P.features(name, "train"))  # (N, D), (N,); as written, so the steps see the file
    te, yte = read_features(P.features(name, "test"))
    if (reason := no_labels(ytr, yte)) is not None:
        log.warning("evaluate %s: the label-based evaluations (kNN, linear probe, SVM, per-layer probes, "
                    "fine-tuning, NMI / ARI) %s", name, reason)
        return {"extract": extract, **{step: {"skipped": f"{step}: {reason}"} for step in ("knn", "linear", "finetune")},
                "cluster": cluster_step(cfg, tr, ytr, te, yte, num_classes, quiet=True)}
    return {"extract": extract,
            "knn": knn_step(cfg, name, P, tr, ytr, te, yte, num_classes),
            "cluster": cluster_step(cfg, tr, ytr, te, yte, num_classes),
            "linear": linear_step(cfg, name, P, tr, ytr, te, yte, num_classes, device),
            "finetune": finetune_step(cfg, name, P, ytr, yte, device)}


def eval_base(cfg: Config, P: Paths, device: torch.device) -> dict[str, Any]:
    """What every method's evaluation depends on besides its model: the dataset, every key the
    ``evaluate`` stage reads (``workers`` aside: the draws do not depend on it), the device type, the
    number of processes and the code the stage runs. A method's key adds its name and model file."""
    from selfsup.core.codedeps import closure, code_hash

    keys = {k: getattr(cfg, k) for k in ("knn", "cluster", "linear", "svm", "probe", "finetune")}
    return {"data": sha256_file(P.dataset / "meta.json"), "params": config_hash(keys),
            "shared": [cfg.seed, cfg.extract.batch_size, cfg.dataset.crop_size, cfg.dataset.resize_size,
                       cfg.whiten.pca_dim], "device": device.type,
            "procs": cfg.dist.nproc_per_node * cfg.dist.nnodes, "code": code_hash(closure("stages/evaluate.py"))}


def evaluate_all(cfg: Config, methods: list[str], P: Paths, device: torch.device
                 ) -> Iterator[tuple[str, dict[str, dict[str, Any]], bool]]:
    """Steps 1-5 for every method, in one process (the ``evaluate`` stage): yields (method, its steps'
    metrics, reused) on rank 0; nothing on the other ranks.

    A method whose key (``eval_base``, its name and model file) is unchanged and whose features are
    on disk (``data/features`` is a persist output) gets its stored metrics back
    (``selfsup.core.io.ResultCache``, ``data/eval_runs``): a new model of one method re-evaluates that
    method only, a changed evaluation key all of them. Why one stage: each process start imports
    torch and scikit-learn, about 4 s here (benchmarks/imports.py), once per method before. With
    several processes every rank first extracts the features of the methods to evaluate (sharded),
    then rank 0 evaluates them, so no rank waits in a collective while rank 0
    fine-tunes."""
    from selfsup.models.backbones import skipped_reason

    # a method that did not train on this data (its model file says why): no evaluation, its row says why
    skipped = {m: r for m in methods if (r := skipped_reason(P.model(m)))}
    if dist.is_main():
        for m, reason in skipped.items():
            yield m, {step: {"skipped": reason} for step in ("extract", "knn", "cluster", "linear", "finetune")}, False
    methods = [m for m in methods if m not in skipped]
    cache = ResultCache(P.eval_runs)
    base = eval_base(cfg, P, device)
    keys = {m: config_hash({**base, "method": m, "model": sha256_file(P.model(m))}) for m in methods}
    stored = {m: cache.get(m, keys[m]) if all(P.features(m, s).is_file() for s in ("train", "test")) else None
              for m in methods}
    # every rank: the sharded extraction of the methods to evaluate
    extracted = {m: extract_all(cfg, m, P, device) for m in methods if stored[m] is None}
    if not dist.is_main():
        return
    for m in methods:
        if m not in extracted:
            yield m, stored[m], True
            continue
        out = evaluate_features(cfg, m, P, device, extracted[m])
        cache.put(m, keys[m], out)
        yield m, out, False

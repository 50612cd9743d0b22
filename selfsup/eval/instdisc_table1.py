"""InstDisc's Table 1 (Wu et al. CVPR 2018, sec. 4.1) as a sweep: parametric softmax,
non-parametric softmax and NCE with m = 1, 10, 512, 4096 noise samples, each evaluated
by a linear classifier and the weighted kNN on the learned features.

A row is the ``instdisc`` params block with the row's ``softmax`` / ``nce_m`` (and
``instdisc_table1.epochs`` when set), trained by the one loop (``selfsup.engine.loop.pretrain``)
and evaluated with the shared protocols (``selfsup.models.features``, ``selfsup.eval.protocols``), all
in one process (``run_row``). The ``table1`` stage runs every row in one process too
(``run_rows``: each process start imports torch, about 4 s here, benchmarks/imports.py), reusing a
row's stored result while its key holds, so adding a row trains only that row. The table itself,
with the paper's figures, is built by ``selfsup.report.results.table1_files``. ``nce_m`` is capped below
the training-set size (the method refuses m >= N); the table reports the m used.

The paper's numbers are CIFAR-10, ResNet-18, 128-d embedding, 200 epochs; its "linear"
column is a linear SVM, ours the linear probe of ``selfsup.eval.linear_probe``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator

from selfsup.core.config import NO_UPSTREAM, Config, config_hash
from selfsup.eval.config import Table1Row
from selfsup.core.io import ResultCache, derive_seed, resolve_device

log = logging.getLogger("selfsup.eval.instdisc_table1")

def row_config(cfg: Config, row: Table1Row, n_train: int) -> tuple[Any, int]:
    """The row's InstDisc config (the ``instdisc`` block + the row) and the m it uses."""
    base = cfg.method("instdisc")
    m = min(row.nce_m, n_train - 1)
    if m != row.nce_m:
        log.warning("table1: nce_m %d capped at %d (the training split has %d images)", row.nce_m, m, n_train)
    over: dict[str, Any] = {"softmax": row.softmax, "nce_m": m}
    if row.softmax == "parametric":
        over["prox_lambda"] = 0.0  # no memory bank, no proximal term
    if cfg.instdisc_table1.epochs:
        over["epochs"] = cfg.instdisc_table1.epochs
    mcfg = dataclasses.replace(base, **over)
    mcfg.check("instdisc")
    return mcfg, m


def row_run_config(cfg: Config, name: str, n_train: int) -> tuple[Config, Any, int]:
    """(the run config that trains row ``name``: ``instdisc`` alone, its block the row's; that block;
    the m it uses)."""
    mcfg, m = row_config(cfg, cfg.instdisc_table1.rows[name], n_train)
    rcfg = dataclasses.replace(cfg, methods={"instdisc": NO_UPSTREAM}, method_cfgs={**cfg.method_cfgs, "instdisc": mcfg})
    return rcfg, mcfg, m


def row_key(cfg: Config, name: str, data: Any) -> str:
    """What a row's result depends on: its training (``selfsup.engine.loop.run_key`` of the row's config: the
    shared keys, the row's InstDisc block, the dataset, the loop's code), the number of processes, and
    what the evaluation reads (the kNN k, the linear probe, the SVM, the extraction, this module's code)."""
    from selfsup.core import dist
    from selfsup.core.codedeps import closure, code_hash
    from selfsup.engine.loop import run_key

    rcfg, _, _ = row_run_config(cfg, name, data.n_train)
    return config_hash({"train": run_key(rcfg, "instdisc", data.meta), "world": dist.world(), "row": name,
                        "knn_k": cfg.instdisc_table1.knn_k, **{k: dataclasses.asdict(getattr(cfg, k)) for k in ("linear", "svm", "extract")},
                        "code": code_hash(closure("selfsup/eval/instdisc_table1.py", "instdisc"))})


def run_rows(cfg: Config, data: Any, folder: str | Path) -> Iterator[tuple[str, dict[str, Any] | None, bool]]:
    """``run_row`` for every row the sweep runs (``Config.table1_rows``), checkpoints under ``folder/<row>/``: yields
    (row, its metrics (None on ranks other than 0), reused). A row whose ``row_key`` is unchanged gets its
    stored metrics back (``selfsup.core.io.ResultCache``, ``folder/results``)."""
    from selfsup.core import dist

    cache = ResultCache(Path(folder) / "results")
    for name in cfg.table1_rows():
        key = row_key(cfg, name, data)
        stored = cache.get(name, key)
        if stored is not None:
            yield name, stored if dist.is_main() else None, True
            continue
        out = run_row(cfg, name, data, Path(folder) / name / "ckpt.pt")
        if out is not None:
            cache.put(name, key, out)
        yield name, out, False


def run_row(cfg: Config, name: str, data: Any, ckpt_path: str | Path) -> dict[str, Any] | None:
    """Pretrain + extract + weighted kNN + linear probe for Table 1 row ``name`` (``data``: a
    ``selfsup.data.prepared.Data``). Several processes: training and extraction are shared, the evaluation
    runs on rank 0 (the other ranks return None)."""
    # torch, faiss and the method registry: imported here so that the report stage needs none
    from selfsup.core import dist
    from selfsup.eval.protocols import knn_protocols, linear_eval, svm_eval
    from selfsup.models.features import apply_head, extract_sharded
    from selfsup.engine.loop import pretrain

    t0 = time.perf_counter()
    row = cfg.instdisc_table1.rows[name]
    rcfg, mcfg, m = row_run_config(cfg, name, data.n_train)
    method, history = pretrain(rcfg, "instdisc", data, ckpt_path)
    device = resolve_device(cfg.device)
    bb, meta, bs = method.backbone, data.meta, cfg.extract.batch_size
    geo = {"workers": cfg.workers, "resize": cfg.dataset.resize_size, "crop": cfg.dataset.crop_size}
    tr = extract_sharded(bb, data.train, meta, device, bs, desc=f"table1 {name} train", **geo)
    te = extract_sharded(bb, data.test, meta, device, bs, desc=f"table1 {name} test", **geo)
    if not dist.is_main():
        return None
    ytr, yte, k = data.train.y, data.test.y, len(meta["classes"])
    # the paper's kNN: on the normalised 128-d embedding (lemniscate's test.py), at the training temperature
    head = method.eval_head()
    htr, hte = apply_head(head, tr, device), apply_head(head, te, device)
    knn = knn_protocols(htr, ytr, hte, yte, ks=[cfg.instdisc_table1.knn_k], temperature=mcfg.temperature,
                        num_classes=k)
    c = cfg.linear
    lin = linear_eval(tr, ytr, te, yte, num_classes=k, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr,
                      weight_decay=c.weight_decay, seed=derive_seed(cfg.seed, "linear", "table1", name),
                      device=device)
    return {
        "softmax": row.softmax, "nce_m": row.nce_m, "nce_m_used": m, "epochs": len(history),
        "final_loss": history[-1]["loss"] if history else math.nan,
        "pretrain_seconds": float(sum(h["seconds"] for h in history)),
        "knn_top1": knn.get("top1", math.nan), "knn_protocol": knn.get("protocol", knn.get("skipped", "")),
        "linear_top1": lin.get("top1", math.nan),
        # the paper's "linear" column is a linear SVM
        "svm_top1": svm_eval(tr, ytr, te, yte, cfg.svm.c, derive_seed(cfg.seed, "svm", "table1", name)).get(
            "svm_top1", math.nan),
        "seconds": time.perf_counter() - t0,
    }

"""The training of the methods a ``pretrain-<m>`` stage (``stages/pretrain.py <m>``) names, in one
process (``train_all``): DVC runs one stage per method, and the script run by hand with several
methods (or none: every method) trains them in turn.

The training loop keys its checkpoint (``selfsup.engine.loop.run_key``: the method's config, the shared
keys, the dataset, the code the loop runs for this method, the upstream encoder's content): a method
whose key is unchanged resumes its finished checkpoint and trains zero steps, and its model file is
rewritten byte for byte (``selfsup.core.io.save_torch``), so a stage DVC re-runs for a change that
does not reach the training (a comment) leaves everything downstream as it was.

The methods run in ``Config.training_order``: ``methods``' order, a method after the method whose
encoder it reads (MLCD clusters DeepCluster's ``data/models/deepcluster.pt``, written earlier in
the same run; under DVC, by the ``pretrain-deepcluster`` stage, a dependency of ``pretrain-mlcd``). Under torchrun every rank runs the same loop; rank 0 writes the outputs and the
ranks meet at a barrier after each method, so a later method never reads an encoder still being
written.
"""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch

from selfsup.core import dist, tracking
from selfsup.core.config import Config
from selfsup.data.prepared import Data
from selfsup.core.io import atomic_path, write_json
from selfsup.engine.pictures import method_pictures, save_png
from selfsup.core.stage import Paths
from selfsup.engine.loop import pretrain, save_backbone


def train_one(cfg: Config, name: str, data: Data, P: Paths, root: Path) -> tuple[dict[str, Any], int]:
    """Train (or resume) method ``name`` and write its outputs (rank 0): the encoder
    (``data/models/<m>.pt``), the per-epoch history (``plots/pretrain/<m>.csv``), what the method
    draws (under ``reports/``), ``metrics/pretrain/<m>.json``. Returns (those metrics, the batches
    trained in this call: 0 when a finished run was resumed)."""
    steps = 0

    def count(epoch: int, batch: int) -> None:
        nonlocal steps
        steps += 1

    tracking.grant()  # each method's MLflow calls get their own time budget
    # the MLflow run of (DVC experiment, method), live while it trains; the later stages' numbers reach
    # it through the report
    tracker = tracking.LiveRun(root, cfg.mlflow.experiment, name, cfg.mlflow.enabled)
    method, history = pretrain(cfg, name, data, P.ckpt(name), on_step=count, tracker=tracker,
                               tracker_params=tracking.run_params(cfg, name))
    hist = pd.DataFrame(history, columns=None if history else ["epoch", "loss", "seconds"])
    final = {k: v for k, v in (history[-1] if history else {}).items() if k != "epoch"}
    metrics = {
        "epochs": len(history),
        "backbone": method.backbone.arch_name,  # <m>.backbone or model.backbone: the report names it per row
        # summed over epochs: a resumed run reports its whole training time, not this call's; a method that
        # does not train (random init, a skipped one) 0, so re-running the stage leaves its metrics as they were
        "seconds": float(hist["seconds"].sum()) if history else 0.0,
        **{f"final_{k}": v for k, v in final.items()},
        **({"skipped": method.skipped} if method.skipped else {}),
    }
    if dist.is_main():  # every rank holds the same weights
        save_backbone(P.model(name), method, cfg, data.meta)
        pics = method_pictures(method, data, next(method.parameters()).device, getattr(method.cfg, "picture_images", 8),
                               cfg.dataset.resize_size, cfg.dataset.crop_size)
        for fname, img in pics.items():
            save_png(P.reports / fname, img, scale=1 if method.skipped else max(1, 96 // (img.shape[0] // 3)))
        tracker.log_artifacts([P.reports / f for f in pics], artifact_path="pictures")
        with atomic_path(P.history(name)) as tmp:
            hist.to_csv(tmp, index=False)
        write_json(P.metrics("pretrain", name), metrics)
    tracker.end()
    dist.barrier()  # a later method may read this one's encoder
    del method
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return metrics, steps


def train_all(cfg: Config, methods: list[str], data: Data, P: Paths, root: Path
              ) -> Iterator[tuple[str, dict[str, Any], int]]:
    """``train_one`` for each of ``methods`` in ``Config.training_order``: yields (method, its metrics,
    batches trained now)."""
    for name in [m for m in cfg.training_order() if m in methods]:
        metrics, steps = train_one(cfg, name, data, P, root)
        yield name, metrics, steps

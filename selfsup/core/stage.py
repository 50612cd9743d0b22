"""What every stage script shares: logging, thread count, the config, standard paths."""
from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfsup.core.config import SAFE_LOADER, Config, ConfigError, load_config

# the check stage's output, a dependency of every other stage (stages/check.py; its content is constant)
CHECKED = "data/params.checked"


@dataclass(frozen=True)
class Paths:
    """The DAG's file layout (dvc.yaml spells the same paths)."""

    root: Path = Path(".")

    @property
    def dataset(self) -> Path:
        return self.root / "data" / "dataset"

    def ckpt(self, m: str) -> Path:
        return self.root / "data" / "pretrain" / m / "ckpt.pt"

    def model(self, m: str) -> Path:
        return self.root / "data" / "models" / f"{m}.pt"

    def features(self, m: str, split: str) -> Path:
        return self.root / "data" / "features" / m / f"{split}.parquet"

    def metrics(self, stage: str, m: str | None = None) -> Path:
        return self.root / "metrics" / (f"{stage}.json" if m is None else f"{stage}/{m}.json")

    def history(self, m: str) -> Path:
        return self.root / "plots" / "pretrain" / f"{m}.csv"

    @property
    def voc(self) -> Path:
        return self.root / "data" / "voc"

    @property
    def eval_runs(self) -> Path:  # the evaluate stage's per-method results, reused while their key holds
        return self.root / "data" / "eval_runs"

    @property
    def voc_runs(self) -> Path:  # the voc stage's per-method results, reused while their key holds
        return self.root / "data" / "voc_runs"

    def voc_classes(self, m: str) -> Path:
        return self.root / "metrics" / "voc" / f"{m}_classes.csv"

    @property
    def reports(self) -> Path:
        return self.root / "reports"


def setup(params: str | Path = "params.yaml", parse_methods: bool | list[str] = True) -> Config:
    """Logging (under torchrun only rank 0 logs at INFO), threads, the config. The training and
    feature stages then call ``selfsup.core.launch.distributed(cfg)``."""
    # At exit the interpreter tears down torch's and torchvision's modules under the cyclic GC, about
    # 0.8 s of every stage here (benchmarks/imports.py, "exit"); frozen, the GC skips those objects.
    # Registered first, so it runs after every other exit handler (MLflow's end of run, DDP's clean-up).
    atexit.register(gc.freeze)
    _config_errors_in_one_line()
    rank = int(os.environ.get("RANK", "0"))
    level = os.environ.get("SELFSUP_LOG", "INFO") if rank == 0 else "WARNING"
    logging.basicConfig(level=level, format=f"%(levelname)s {f'[rank {rank}] ' if rank else ''}%(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if "SELFSUP_THREADS" in os.environ:
        import torch

        torch.set_num_threads(int(os.environ["SELFSUP_THREADS"]))
    return load_config(params, parse_methods)


def _config_errors_in_one_line() -> None:
    """A ConfigError names a key of params.yaml for the user to fix: the stage prints it as one line
    (``params: <key>: ...``) and exits 1, without the traceback; every other exception is a bug and
    keeps its traceback."""
    previous = sys.excepthook
    if getattr(previous, "one_line_config_errors", False):
        return

    def hook(tp: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(tp, ConfigError):
            print(f"params: {value}", file=sys.stderr, flush=True)
        else:
            previous(tp, value, tb)

    hook.one_line_config_errors = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def check_stage_upstream(root: Path, cfg: Config) -> None:
    """Each upstream file a pretraining reads (params.yaml ``methods.<m>``) must be a DVC dependency of
    its ``pretrain-<m>`` stage (another method's encoder too: DVC then trains that method first), else DVC
    would not re-run it when that file changes (``dvc exp run -S methods.mlcd=...`` changes the param
    but not the generated stage: fail and say how to fix)."""
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return
    import yaml

    stages = (yaml.load(dvc_yaml.read_text(), Loader=SAFE_LOADER) or {}).get("stages", {})  # noqa: S506
    for m in cfg.methods:
        stage = stages.get(f"pretrain-{m}")
        up = cfg.upstream(m)
        if stage is not None and up is not None and up not in stage.get("deps", []):
            raise SystemExit(f"dvc.yaml: stage pretrain-{m} does not depend on {up} (params.yaml methods.{m}); "
                             "run `python -m selfsup.dag` to regenerate it")

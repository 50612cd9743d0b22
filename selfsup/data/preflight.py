"""The ``check`` stage's work: params.yaml against this machine, before any other stage runs.

DVC removes a stage's outputs right before it runs the stage's command, so a bad value that only the
stage itself rejects costs the outputs of the last good run (every model of ``pretrain``, the
prepared dataset). The ``check`` stage runs first (every stage depends on its output) and fails
instead: the typed config of every section and method block (``selfsup.core.config.load_config``: unknown
keys anywhere, values of the wrong type or range), then what the config alone cannot know, checked
here: that ``dataset.path`` exists as ``dataset.name`` reads it and that ``device`` exists.
"""
from __future__ import annotations

from selfsup.core.config import Config, ConfigError
from selfsup.data.sources import DatasetUnavailable, check_source


def check_device(name: str) -> None:
    """``cuda`` / ``cuda:N`` on a machine without CUDA, or an N past its GPUs, is a ConfigError."""
    if not name.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r}, but CUDA is not available here (use auto or cpu)")
    index = int(name.split(":", 1)[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device: {name!r}, but this machine has {torch.cuda.device_count()} GPU(s) "
                          f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")


def preflight(cfg: Config) -> None:
    """Every check of ``cfg`` against the files and the machine; raises ConfigError naming the key."""
    try:
        check_source(cfg.dataset)
    except DatasetUnavailable as e:
        raise ConfigError(str(e)) from e
    check_device(cfg.device)

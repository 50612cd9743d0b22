"""The method registry, lazy: ``REGISTRY[name]`` imports ``selfsup/methods/<name>.py`` on first use
and returns the class it registered with ``@register``; its ``Config`` parses the params block of
the same name.

Nothing here imports a method eagerly, so a stage's import closure (hence its DVC code deps and
its checkpoint key, see ``selfsup/core/codedeps.py``) holds only the methods it runs. Adding a method:
a file here with ``@register``, a params block and an entry in ``methods:``.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Iterator, MutableMapping

from selfsup.engine.contract import Batch, EpochPlan, Method, StepOut, TrainContext

_DIR = Path(__file__).resolve().parent
_NOT_METHODS = {"__init__", "base"}


def available() -> list[str]:
    """Names of the method files (no import)."""
    return sorted(p.stem for p in _DIR.glob("*.py") if p.stem not in _NOT_METHODS)


class _Registry(MutableMapping[str, type[Method]]):
    def __init__(self) -> None:
        self._classes: dict[str, type[Method]] = {}

    def __getitem__(self, name: str) -> type[Method]:
        if name not in self._classes:
            if name not in available():
                raise KeyError(name)
            importlib.import_module(f"selfsup.methods.{name}")  # runs its @register
            if name not in self._classes:
                raise KeyError(f"selfsup/methods/{name}.py registers no method named {name!r}")
        return self._classes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._classes or (isinstance(name, str) and name in available())

    def __setitem__(self, name: str, cls: type[Method]) -> None:
        self._classes[name] = cls

    def __delitem__(self, name: str) -> None:
        del self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(available()) | set(self._classes)))

    def __len__(self) -> int:
        return len(set(available()) | set(self._classes))


REGISTRY = _Registry()


def register(cls: type[Method]) -> type[Method]:
    if cls.name in REGISTRY._classes:
        raise ValueError(f"method {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


__all__ = ["REGISTRY", "register", "available", "Method", "Batch", "StepOut", "EpochPlan", "TrainContext"]

"""Method registry: ``REGISTRY[name]`` is the method class; its ``Config`` parses the
params block of the same name. Adding a method: a file here with ``@register``,
an import below, a params block and an entry in ``methods:``."""
from __future__ import annotations

from selfsup.methods.base import EpochPlan, Method, TrainContext

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


# imported for their @register side effect
from selfsup.methods import deepcluster, mlcd, random, sela, supervised  # noqa: E402,F401
from selfsup.methods import instdisc, invaspread, moco, simclr  # noqa: E402,F401

__all__ = ["REGISTRY", "register", "Method", "EpochPlan", "TrainContext"]

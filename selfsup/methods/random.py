"""Random-init baseline: the backbone exactly as every method starts it (same seed), untrained."""
from __future__ import annotations

from dataclasses import dataclass

from selfsup.methods import register
from selfsup.methods.base import Method


@dataclass
class RandomCfg:
    sobel: bool = False  # the Sobel front end of the method this baseline stands beside

    def check(self, p: str) -> None:
        pass


@register
class RandomInit(Method):
    name = "random"
    Config = RandomCfg
    trains = False

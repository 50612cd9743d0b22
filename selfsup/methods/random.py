"""Random-init baseline: the backbone exactly as every method starts it (same seed), untrained."""
from __future__ import annotations

from dataclasses import dataclass

from selfsup.core.config import one_of
from selfsup.models.config import BACKBONES
from selfsup.methods import register
from selfsup.engine.contract import Method


@dataclass
class RandomCfg:
    sobel: bool = False  # the Sobel front end of the method this baseline stands beside
    backbone: str = ""  # "" = model.backbone; the baseline of methods that set their own (random_vit)

    def check(self, p: str) -> None:
        if self.backbone:
            one_of(p, "backbone", self.backbone, BACKBONES)


@register
class RandomInit(Method):
    name = "random"
    Config = RandomCfg
    trains = False

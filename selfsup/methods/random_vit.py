"""Random-init baseline of the ViT-based methods (DINO, MoCo v3, MAE, BEiT on the digits default): the
random baseline with its own ``backbone`` key (``random_vit.backbone``, the small ViT), so the report
holds the init those methods start from beside the conv-net one of the others."""
from __future__ import annotations

from dataclasses import dataclass

from selfsup.methods import register
from selfsup.methods.random import RandomCfg, RandomInit


@dataclass
class RandomViTCfg(RandomCfg):
    backbone: str = "vit_digits"


@register
class RandomViT(RandomInit):
    name = "random_vit"
    Config = RandomViTCfg

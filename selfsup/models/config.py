"""The sections the models layer reads: ``model:`` (the backbone, ``selfsup/models/backbones.py``),
``extract:`` (feature extraction, ``selfsup/models/features.py``) and ``tokenizer:`` (BEiT's visual
tokeniser, ``selfsup/models/tokenizer.py``). Parsed when first read (``selfsup.core.config.SECTIONS``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from selfsup.core.config import ConfigError, one_of, positive


BACKBONES = ("smallcnn", "nin", "nin_rotnet", "resnet18_cifar", "resnet50_cifar", "resnet18", "resnet50", "alexnet_bn",
             "alexnet_rotnet", "alexnet_cfn",
             "vit_tiny", "vit_small", "vit_base", "vit_digits", "vit_small_p4", "vit_base_p4")


@dataclass
class ModelCfg:
    backbone: str = "smallcnn"  # the fixed Sobel front end is per method (<method>.sobel)

    def check(self, p: str) -> None:
        one_of(p, "backbone", self.backbone, BACKBONES)


@dataclass
class ExtractCfg:
    batch_size: int = 256

    def check(self, p: str) -> None:
        positive(p, self, "batch_size")


@dataclass
class TokenizerCfg:
    """The ``tokenizer:`` block of params.yaml (the tokenizer stage). Defaults: a vq tokeniser on BEiT's
    ViT-B/16 grid with the paper's vocabulary (8192); params.yaml has the digits ones; ``selfsup/models/tokenizer.py`` builds
    and trains the tokeniser."""

    kind: str = "vq"  # vq: a VQ-VAE trained here | dalle (the paper's): DALL-E's dVAE encoder from a local weights file
    path: str = ""  # dalle: the encoder state_dict file (see the module docstring for the conversion)
    patch: int = 16  # px per token side: must equal the ViT's patch (one token per patch)
    # vq only
    vocab: int = 8192  # codebook entries (DALL-E: 8192, taken from its weights)
    hidden: int = 128  # conv channels
    dim: int = 64  # codebook entry dimension
    epochs: int = 10
    batch_size: int = 256
    lr: float = 2.0e-4  # Adam (van den Oord et al.: 2e-4)
    beta: float = 0.25  # commitment cost
    decay: float = 0.99  # codebook EMA decay
    reseed: float = 1.0  # re-seed codes assigned fewer than this many times per batch (EMA count); 0: never
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # training crops
    flip: bool = True  # training flips
    seed: int = 0

    def check(self, p: str) -> None:
        one_of(p, "kind", self.kind, ("vq", "dalle"))
        positive(p, self, "patch", "vocab", "hidden", "dim", "epochs", "batch_size", "lr")
        if self.kind == "dalle" and not self.path:
            raise ConfigError(f"{p}.path: kind dalle needs the DALL-E encoder weights file (a state_dict)")
        if self.kind == "vq" and self.patch & (self.patch - 1):
            raise ConfigError(f"{p}.patch: the vq tokeniser downsamples by stride-2 convs: a power of 2, got {self.patch}")
        if self.kind == "vq" and self.vocab < 2:
            raise ConfigError(f"{p}.vocab: at least 2 codes, got {self.vocab}")
        if self.beta < 0:
            raise ConfigError(f"{p}.beta: must be >= 0, got {self.beta}")
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"{p}.decay: an EMA decay in [0, 1), got {self.decay}")
        if self.reseed < 0:
            raise ConfigError(f"{p}.reseed: must be >= 0, got {self.reseed}")
        lo_hi = self.crop_scale
        if len(lo_hi) != 2 or not 0.0 < lo_hi[0] <= lo_hi[1] <= 1.0:
            raise ConfigError(f"{p}.crop_scale: need [lo, hi] with 0 < lo <= hi <= 1, got {lo_hi}")

"""Backbones by name. Each returns an ``nn.Module`` mapping (B, C, H, W) -> (B, out_dim).

- ``smallcnn``: three conv-BN-ReLU blocks and global average pooling, sized for
  the embedded 8x8 digits on a CPU (128-d).
- ``resnet18_cifar``: torchvision ResNet-18 with the CIFAR stem (3x3 stride-1
  conv, no max-pool), as in InstDisc / MoCo's CIFAR demo (512-d); ``resnet50_cifar`` the same
  for ResNet-50 (2048-d: SimCLR's CIFAR-10 number is a ResNet-50 with this stem).
- ``resnet18`` / ``resnet50``: torchvision ResNets, ImageNet stem (512 / 2048-d).
- ``nin``: RotNet's CIFAR network (Gidaris et al. 2018): four network-in-network blocks, 192-d, with the
  class's default average pool after block 3; ``nin_rotnet``: without it, as RotNet's CIFAR config.
- ``alexnet_rotnet``: RotNet's AlexNet (conv 64-192-384-256-256 with BN, fc 4096-4096 as Linear-BN-ReLU);
  ``alexnet_cfn``: the Jigsaw tile trunk (CaffeNet conv1-pool5 with LRN, conv1 stride 2), 2304-d (``AlexNetBN``).
- ``alexnet_bn``: DeepCluster's AlexNet (conv 96-256-384-384-256 with batch norm,
  fc 4096-4096), optional fixed Sobel front end. torchvision has no BN AlexNet,
  so it is written here. Its output is fc7 *before* the final ReLU: DeepCluster's
  official code clusters those pre-activation features and puts the ReLU back for
  training (``relu_head``).
- ``vit_tiny`` / ``vit_small`` / ``vit_base``: Vision Transformers with 16 px patches (192-d 12 layers
  3 heads / 384-d 12 / 6 / 768-d 12 / 12, MLP 4x; DINO's ViT-T/S/B); ``vit_digits``: 2 px patches
  (16 patches of an 8x8 digit), 64-d, 2 layers, 4 heads, MLP 2x, for the digits on a CPU (4 layers
  trained about as well in short supervised and MoCo v3 runs on digits, at twice the cost). Output:
  the CLS token after the final LayerNorm (``ViT``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.core.config import ConfigError
from selfsup.models.heads import EvalHead
from selfsup.core.io import InputError, load_torch, save_torch

# smallest input side each backbone accepts (AlexNet's stride-4 stem and three
# 3x3/2 max-pools need >= 63 px)
MIN_SIZE = {"smallcnn": 4, "nin": 8, "resnet18_cifar": 8, "resnet50_cifar": 8, "resnet18": 32, "resnet50": 32, "alexnet_bn": 63}
# RotNet's CIFAR NIN and AlexNet (the stem of alexnet_bn); Jigsaw's stride-2 tile trunk with ceil pooling
MIN_SIZE.update({"nin_rotnet": 8, "alexnet_rotnet": 63, "alexnet_cfn": 25})
# Vision Transformers: (patch, width, depth, heads, MLP width, default image side). The default side
# (the position-embedding grid) is used when no image size is given; a ViT takes one patch at least
VITS = {"vit_tiny": (16, 192, 12, 3, 768, 224), "vit_small": (16, 384, 12, 6, 1536, 224),
        "vit_base": (16, 768, 12, 12, 3072, 224), "vit_digits": (2, 64, 2, 4, 128, 8),
        # 32 px images (the CIFAR presets of MAE / BEiT): 4 px patches, an 8 x 8 grid
        "vit_small_p4": (4, 384, 12, 6, 1536, 32), "vit_base_p4": (4, 768, 12, 12, 3072, 32)}
MIN_SIZE.update({name: v[0] for name, v in VITS.items()})


class Sobel(nn.Module):
    """Fixed grayscale + Sobel-x/y filters (DeepCluster sec. 4: removes colour cues)."""

    def __init__(self, in_channels: int):
        super().__init__()
        gray = nn.Conv2d(in_channels, 1, 1, bias=False)
        gray.weight.data.fill_(1.0 / in_channels)
        sob = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        sob.weight.data[0, 0] = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])
        sob.weight.data[1, 0] = torch.tensor([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]])
        self.net = nn.Sequential(gray, sob)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 2, H, W)
        return self.net(x)


class LabL(nn.Module):
    """The colourisation encoder's input adapter (Zhang et al. 2016): normalised RGB -> the CIE L
    channel, centred as the official code feeds it (L - 50, range [-50, 50]). Saved with the encoder
    (``arch.adapter``), so feature extraction, the probes and VOC transfer give it RGB like any other
    backbone."""

    in_channels = 3

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) normalised -> (B, 1, H, W)
        from selfsup.augment.colour import rgb_to_lab

        rgb = (x.float() * self.std + self.mean).clamp(0.0, 1.0)
        return (rgb_to_lab(rgb)[:, :1] - 50.0).to(x.dtype)


class LabViews(nn.Module):
    """CMC's input (Tian et al. 2020, sec. 4; official ``RGB2Lab`` + ``Normalize``): normalised RGB ->
    CIE Lab, each channel scaled to about [-1, 1] with the official constants (L: mean 50, std 50;
    a: (-86.183 + 98.233) / 2 and (86.183 + 98.233) / 2; b: (-107.857 + 94.478) / 2 and
    (107.857 + 94.478) / 2, the channels' ranges over sRGB). The trunk after it is a ``SplitTrunk``:
    channel 0 (L) to one encoder, channels 1-2 (ab) to the other."""

    in_channels = 3
    LAB_MEAN = (50.0, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2)
    LAB_STD = (50.0, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2)

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("lab_mean", torch.tensor(self.LAB_MEAN).view(1, 3, 1, 1))
        self.register_buffer("lab_std", torch.tensor(self.LAB_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) normalised RGB -> (B, 3, H, W) Lab
        from selfsup.augment.colour import rgb_to_lab

        rgb = (x.float() * self.std + self.mean).clamp(0.0, 1.0)
        return ((rgb_to_lab(rgb) - self.lab_mean) / self.lab_std).to(x.dtype)


class SplitTrunk(nn.Module):
    """Two encoders over disjoint channel groups of one input (CMC's L and ab encoders): features
    ``cat(f_0(x[:, g_0]), f_1(x[:, g_1]))``, (B, d_0 + d_1); ``dims`` holds (d_0, d_1) for the
    method to split them again. The per-layer probes read both encoders at the same stage,
    concatenated along the channels (the paper's Table 2 probes both halves of AlexNet): ``joint``
    holds one identity module per stage, called on that concatenation when something hooks it."""

    def __init__(self, trunks: list[nn.Module], groups: list[list[int]], dims: list[int]):
        super().__init__()
        self.views = nn.ModuleList(trunks)
        self.groups = [list(g) for g in groups]
        self.dims = list(dims)
        try:
            points = [_plain_probe_points(t) for t in trunks]
        except AttributeError:  # a trunk without conv stages (a ViT): no per-layer probe points
            points = [{} for _ in trunks]
        self.joint = nn.ModuleDict({name: nn.Identity() for name in points[0]})
        self._points = points
        self._grabbed: list[dict[str, torch.Tensor]] = [{} for _ in trunks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, sum(dims))
        wanted = [n for n, m in self.joint.items() if m._forward_hooks]
        hooks = [pts[n].register_forward_hook(lambda _m, _i, o, n=n, g=g: g.__setitem__(n, o))
                 for pts, g in zip(self._points, self._grabbed) for n in wanted]
        try:
            out = torch.cat([t(x[:, g]) for t, g in zip(self.views, self.groups)], dim=1)
        finally:
            for h in hooks:
                h.remove()
        for n in wanted:  # the stage's activations of both encoders, side by side: (B, C_0 + C_1, h, w)
            self.joint[n](torch.cat([g.pop(n) for g in self._grabbed], dim=1))
        return out


# kind -> (module class, channels it hands the trunk, the channel groups of a SplitTrunk or None)
ADAPTERS = {"lab_l": (LabL, 1, None), "lab_views": (LabViews, 3, [[0], [1, 2]])}


def build_adapter(spec: dict[str, Any] | None, in_channels: int) -> tuple[nn.Module | None, int]:
    """(the input adapter a spec describes or None, the channels the rest of the network sees)."""
    if spec is None:
        return None, in_channels
    kind = spec.get("kind")
    if kind not in ADAPTERS:
        raise ValueError(f"unknown input adapter {kind!r}; known: {', '.join(ADAPTERS)}")
    cls, out, _ = ADAPTERS[kind]
    if in_channels != cls.in_channels:
        raise ValueError(f"input adapter {kind} takes {cls.in_channels} channels, the data has {in_channels}")
    return cls(**{k: v for k, v in spec.items() if k != "kind"}), out


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, width: int = 32):
        super().__init__()

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        w = width
        self.net = nn.Sequential(
            *block(in_channels, w), *block(w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out_dim = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 4w)


class NIN(nn.Module):
    """RotNet's CIFAR-10 network (Gidaris et al. 2018, sec. 3; gidariss/FeatureLearningRotNet@8539de6
    architectures/NetworkInNetwork.py): ``blocks`` network-in-network blocks of three conv-BN-ReLU units
    (a k x k conv then two 1 x 1), 192 channels (block 1: 192-160-96); a 3 x 3 / 2 max-pool after block 1,
    a 3 x 3 / 2 average pool after block 2 and, with ``avgpool_block3`` (the class's
    ``use_avg_on_conv3``, default True, only with more than 3 blocks), after block 3; global average
    pooling at the end (192-d). Backbone ``nin``: the class defaults, 32 px maps to 16, 8, 4, 4;
    ``nin_rotnet``: the RotNet CIFAR config (``config/CIFAR10_RotNet_NIN4blocks.py``: net_opt
    ``use_avg_on_conv3`` False), 32 px maps to 16, 8, 8, 8. The paper's RotNet has 4 blocks and evaluates
    each block's output (``selfsup.eval.layer_probes``: block1-block4). Init: He normal on the fan-out, BN weight 1
    and bias 0 (the class's ``weight_initialization``)."""

    def __init__(self, in_channels: int, blocks: int = 4, avgpool_block3: bool = True):
        super().__init__()

        def unit(i: int, o: int, k: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, k, padding=(k - 1) // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        # (in, k x k out, 1 x 1 out, 1 x 1 out, k) per block
        spec = [(in_channels, 192, 160, 96, 5), (96, 192, 192, 192, 5)] + [(192, 192, 192, 192, 3)] * (blocks - 2)
        pools: list[list[nn.Module]] = [[nn.MaxPool2d(3, 2, 1)], [nn.AvgPool2d(3, 2, 1)]]
        pools += [[nn.AvgPool2d(3, 2, 1)] if blocks > 3 and avgpool_block3 else []] + [[]] * (blocks - 3)
        self.blocks = nn.ModuleList(
            nn.Sequential(*unit(i, a, k), *unit(a, b, 1), *unit(b, c, 1), *pool)
            for (i, a, b, c, k), pool in zip(spec, pools))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 192
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            # block 1: (B, 96, H/2, W/2), block 2: (B, 192, H/4, W/4), blocks 3+: (B, 192, H/8, W/8) with the
            # average pool after block 3, (B, 192, H/4, W/4) without
            x = b(x)
        return self.pool(x)  # (B, 192)


# conv layers per AlexNet variant: (out_channels, kernel, stride, padding, groups) or "M" for a 3 x 3 / 2
# max-pool; "N" for a local response normalisation (CaffeNet's: size 5, alpha 1e-4, beta 0.75, k 1)
ALEXNETS: dict[str, list[Any]] = {
    # DeepCluster's AlexNet (facebookresearch/deepcluster models/alexnet.py): 96-256-384-384-256, BN
    "alexnet_bn": [(96, 11, 4, 2, 1), "M", (256, 5, 1, 2, 1), "M", (384, 3, 1, 1, 1), (384, 3, 1, 1, 1),
                   (256, 3, 1, 1, 1), "M"],
    # RotNet's AlexNet (gidariss/FeatureLearningRotNet@8539de6 architectures/AlexNet.py): 64-192-384-256-256, BN
    "alexnet_rotnet": [(64, 11, 4, 2, 1), "M", (192, 5, 1, 2, 1), "M", (384, 3, 1, 1, 1), (256, 3, 1, 1, 1),
                       (256, 3, 1, 1, 1), "M"],
    # the Jigsaw context-free network's tile trunk (MehdiNoroozi/JigsawPuzzleSolver@8041c58
    # train_val_cfn_jps.prototxt conv1_s1 ... pool5_s1): CaffeNet with conv1 stride 2 and no padding, LRN
    # after pool1 and pool2, groups of 2 in conv2 / conv4 / conv5, no BN
    "alexnet_cfn": [(96, 11, 2, 0, 1), "M", "N", (256, 5, 1, 2, 2), "M", "N", (384, 3, 1, 1, 1), (384, 3, 1, 1, 2),
                    (256, 3, 1, 1, 2), "M"],
}


class AlexNetBN(nn.Module):
    """The AlexNets of the papers by backbone name (``ALEXNETS``); ``features`` holds the conv layers,
    each conv followed by its BN (not in alexnet_cfn) and ReLU, the probe points conv1-conv5.

    - ``alexnet_bn`` (DeepCluster): adaptive average pooling to 6 x 6 (identity at 224 px, lets other
      sizes >= 63 px work), fc6 / fc7 as Dropout-Linear-ReLU-Dropout-Linear; the output is fc7 *before*
      its ReLU, which lives in the head (``relu_head``): DeepCluster clusters those pre-activation
      features. Init: He-normal convs, N(0, 0.01) linears, zero biases (DeepCluster's).
    - ``alexnet_rotnet`` (RotNet): the same pooling, fc6 / fc7 as Linear (no bias) - BN - ReLU, no
      dropout (the official ``fc_block``); the output is fc7 after its ReLU (the classifier's input).
      torch's default init: the official code never calls an init.
    - ``alexnet_cfn`` (Jigsaw's tile trunk, conv1-pool5): max-pools with Caffe's ceil rounding, so a
      64 px tile gives 27, 13, 6 and a 3 x 3 pool5 map (floor rounding: a degenerate 2 x 2); adaptive
      average pooling to 3 x 3 (identity at 64 px) for other sizes; no fc layers (fc6 is per tile in the
      Jigsaw head, ``jigsaw.tile_fc``): the output is pool5 flattened (2304-d, after the ReLU). Init: the
      prototxt's fillers, N(0, 0.01) weights, biases 0 (conv1, conv3) or 1 (conv2, conv4, conv5).
    """

    CFG = ALEXNETS["alexnet_bn"]

    def __init__(self, in_channels: int, variant: str = "alexnet_bn"):
        super().__init__()
        if variant not in ALEXNETS:
            raise ValueError(f"unknown AlexNet variant {variant!r}; choose one of {', '.join(ALEXNETS)}")
        self.variant = variant
        caffe = variant == "alexnet_cfn"
        layers: list[nn.Module] = []
        c = in_channels
        for v in ALEXNETS[variant]:
            if v == "M":
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=caffe))
            elif v == "N":
                layers.append(nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0))
            else:
                o, k, s, p, g = v
                layers += [nn.Conv2d(c, o, k, s, p, groups=g)] + ([] if caffe else [nn.BatchNorm2d(o)])
                layers.append(nn.ReLU(inplace=True))
                c = o
        self.features = nn.Sequential(*layers)
        self.relu_head = variant == "alexnet_bn"
        if caffe:
            self.pool = nn.AdaptiveAvgPool2d((3, 3))
            self.classifier: nn.Module = nn.Identity()
            self.out_dim = c * 3 * 3
            biases = iter([0.0, 1.0, 0.0, 1.0, 1.0])  # conv1 ... conv5 bias_filler values
            for m in self.features:
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.constant_(m.bias, next(biases))
            return
        self.pool = nn.AdaptiveAvgPool2d((6, 6))
        if variant == "alexnet_rotnet":
            self.classifier = nn.Sequential(
                nn.Linear(c * 6 * 6, 4096, bias=False), nn.BatchNorm1d(4096), nn.ReLU(inplace=True),
                nn.Linear(4096, 4096, bias=False), nn.BatchNorm1d(4096), nn.ReLU(inplace=True))
            self.out_dim = 4096
            return
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(c * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(4096, 4096),  # final ReLU lives in the head (relu_head)
        )
        self.out_dim = 4096
        for m in self.modules():  # DeepCluster's init: He-normal convs, N(0, 0.01) linears
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, out_dim): fc7 (alexnet_bn, alexnet_rotnet) or pool5 flattened (alexnet_cfn)
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class PatchMap(nn.Identity):
    """A probe point of a ViT block: called with the block's patch tokens as a (B, D, h, w) map (a view,
    no copy) and returning it unchanged, so forward hooks (``selfsup.eval.layer_probes``) see a conv-like map."""


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016) as the ViT papers' code uses it (timm's ``DropPath``, in
    DeiT / DINO / MAE / BEiT): in training, a residual branch's output is zeroed for a whole sample with
    probability ``p`` and kept samples are scaled by 1 / (1 - p); identity in eval mode. It stands in
    for the dropout that ends each branch of torchvision's ``EncoderBlock`` (``dropout`` after the
    attention, ``mlp[4]``), which it still applies first (``dropout``: that dropout's rate)."""

    def __init__(self, p: float, dropout: float = 0.0):
        super().__init__()
        self.p, self.dropout = p, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (B, ...)
        x = F.dropout(x, self.dropout, self.training)
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)  # (B, 1, ..)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, dropout={self.dropout}"


def sincos_pos_embed(dim: int, h: int, w: int, cls: bool = True, first: str = "w") -> torch.Tensor:
    """(1 + h w, dim) fixed 2-D sin-cos position embedding of an h x w patch grid in row-major order (a zero
    row first for the CLS token with ``cls``): half the channels encode one grid coordinate, half the other,
    each as [sin, cos] of pos / 10000^(i / (dim / 4)), i < dim / 4. ``first``: the coordinate of the first
    half. "w" (the column) is MAE's ``get_2d_sincos_pos_embed`` (facebookresearch/mae
    ``util/pos_embed.py``: its ``emb_h`` reads ``grid[0]``, the w coordinate of ``np.meshgrid(grid_w,
    grid_h)``); "h" (the row) is MoCo v3's ``build_2d_sincos_position_embedding`` (facebookresearch/moco-v3
    ``vits.py``: ``torch.meshgrid(grid_w, grid_h)`` indexes "ij", so its ``out_w`` walks the slow, row,
    index of the patch order; the same formula and temperature otherwise; its grids are square)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    if first not in ("w", "h"):
        raise ValueError(f"sin-cos position embedding: first must be 'w' (MAE) or 'h' (MoCo v3), got {first!r}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")  # (h, w) each: row, column of each patch

    def enc(pos: torch.Tensor) -> torch.Tensor:  # (h, w) -> (h w, dim/2)
        out = pos.flatten()[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], 1)

    halves = [enc(gx), enc(gy)] if first == "w" else [enc(gy), enc(gx)]
    emb = torch.cat(halves, 1).float()  # (h w, dim)
    return torch.cat([torch.zeros(1, dim), emb]) if cls else emb


class RelPosBias(nn.Module):
    """BEiT's relative position bias (Bao et al. 2022, sec. 2.5; microsoft/unilm@768a3c8
    ``beit/modeling_finetune.py`` ``RelativePositionBias``): a learned table of one value per head for
    each 2-D offset between two patches of the g x g grid ((2 g - 1)^2 rows) and three more rows for
    CLS -> patch, patch -> CLS and CLS -> CLS, zero at init (the official trunc-normal is commented out).
    ``forward(h, w)`` -> the (heads, 1 + h w, 1 + h w) bias added to the attention logits (query rows,
    key columns), patches in row-major order. Another grid than the one it was built for (detection's
    image sizes) reads the offset part of the table bicubically resized to (2 h - 1) x (2 w - 1) (the
    official fine-tuning resizes it geometrically with scipy when the input size changes)."""

    def __init__(self, grid: int, heads: int):
        super().__init__()
        self.grid, self.heads = grid, heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2 + 3, heads))

    @staticmethod
    def index(h: int, w: int) -> torch.Tensor:
        """(1 + h w, 1 + h w) long: the table row of each (query, key) pair for an h x w grid whose
        offset part has (2 h - 1) x (2 w - 1) rows, then the three CLS rows (the official layout)."""
        gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        yy, xx = gy.flatten(), gx.flatten()  # (h w,) row, column of each patch
        dy = yy[:, None] - yy[None, :] + h - 1  # (h w, h w) in [0, 2 h - 2]
        dx = xx[:, None] - xx[None, :] + w - 1
        n = (2 * h - 1) * (2 * w - 1)
        idx = torch.empty(1 + h * w, 1 + h * w, dtype=torch.long)
        idx[1:, 1:] = dy * (2 * w - 1) + dx
        idx[0, :] = n  # CLS query -> every key (official: num_relative_distance - 3)
        idx[:, 0] = n + 1  # patch query -> CLS key (- 2)
        idx[0, 0] = n + 2  # CLS -> CLS (- 1)
        return idx

    def forward(self, h: int, w: int) -> torch.Tensor:  # -> (heads, 1 + h w, 1 + h w)
        t = self.relative_position_bias_table  # ((2 g - 1)^2 + 3, heads)
        g = self.grid
        if (h, w) != (g, g):
            off = t[:-3].t().reshape(1, self.heads, 2 * g - 1, 2 * g - 1)
            off = F.interpolate(off.float(), size=(2 * h - 1, 2 * w - 1), mode="bicubic", align_corners=False)
            t = torch.cat([off.to(t.dtype).flatten(2)[0].t(), t[-3:]])  # ((2h-1)(2w-1) + 3, heads)
        n = 1 + h * w
        return t[self.index(h, w).to(t.device).flatten()].view(n, n, self.heads).permute(2, 0, 1)


class BEiTBlock(nn.Module):
    """A pre-norm transformer block as BEiT's (microsoft/unilm@768a3c8 ``beit/modeling_finetune.py``
    ``Block`` / ``Attention``): x + drop_path(gamma_1 attn(norm1 x)), then x + drop_path(gamma_2
    mlp(norm2 x)); LayerNorm eps 1e-6, GELU MLP, the fused q, k, v projection without bias plus learned
    q and v biases (no k bias: it adds a per-query constant, which the softmax ignores), an additive
    attention bias (the ViT's shared ``RelPosBias`` passed in, and / or the block's own
    ``rel_pos_bias`` after ``ViT.unshare_rel_pos_bias``), layer scale ``gamma`` (per channel, init
    ``layer_scale``; 0: none) and stochastic depth (``drop_path``). Why not torchvision's
    ``EncoderBlock``: its ``nn.MultiheadAttention`` takes a mask only as an argument of each call and has
    no per-branch scale, so the bias and the layer scale would wrap its internals; this block is small
    and states them directly."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, layer_scale: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        if layer_scale > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        else:
            self.gamma_1 = self.gamma_2 = None
        self.drop_path: nn.Module = nn.Identity()
        self.rel_pos_bias: RelPosBias | None = None  # the block's own table (fine-tuning), else none

    def attention(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """(B, N, D), additive logit bias (heads, N, N) or None -> (B, N, D)."""
        b, n, d = x.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])  # (3 D,)
        qkv = F.linear(x, self.qkv.weight, qkv_bias).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, D / heads)
        mask = None if bias is None else bias.to(q.dtype)[None]  # (1, heads, N, N), added to q k^T / sqrt(d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, N, D / heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, hw: tuple[int, int] | None = None
                ) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        if self.rel_pos_bias is not None:
            if hw is None:
                raise ValueError("BEiTBlock: a block with its own relative position bias needs the grid (hw)")
            own = self.rel_pos_bias(*hw)
            bias = own if bias is None else bias + own
        a = self.attention(self.norm1(x), bias)
        x = x + self.drop_path(a if self.gamma_1 is None else self.gamma_1 * a)
        m = self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x + self.drop_path(m if self.gamma_2 is None else self.gamma_2 * m)


class ViT(nn.Module):
    """A Vision Transformer (Dosovitskiy et al. 2021) built on torchvision's configurable
    ``torchvision.models.vision_transformer.VisionTransformer``: kept by torchvision (installed; timm is
    not), any image and patch size, width, depth and heads, and the papers' layout (a conv patch
    projection, a learned CLS token and position embedding, pre-norm blocks of multi-head attention and
    a GELU MLP, a final LayerNorm, eps 1e-6), so DINO's and MoCo v3's ViT-S / ViT-B configurations are
    expressible. Its classification head is removed (``heads`` is an identity).

    - Features: the CLS token after the final LayerNorm (``out_dim`` = width), what DINO's and MoCo v3's
      linear probes and DINO's kNN read.
    - Input size: the position embedding is a grid for ``image_size`` (the training view side the
      backbone is built for); other sizes (multi-crop's local crops, another eval geometry) get it
      bicubically resized to their patch grid, as DINO's ``interpolate_pos_encoding``. A side that is
      not a multiple of the patch is cut down to one (the strided conv drops the rest).
    - ``in_channels`` != 3: the patch projection is replaced by one for that many channels (the same
      init as torchvision's).
    - ``freeze_patch_embed()``: the patch projection stays at its random init (MoCo v3 sec. 4.2,
      "random patch projection"; the official ``--stop-grad-conv1``).
    - ``blocks``: one ``PatchMap`` per transformer block, the probe points ``selfsup.eval.layer_probes`` finds
      (block1 ... blockN: each block's patch tokens as a map).
    - ``set_drop_path(rate)``: stochastic depth (``DropPath``), used by the fine-tuning evaluation
      (``finetune.drop_path``: MAE's and BEiT's 0.1) and the pre-training of BEiT (``beit.drop_path``)
      and of DINO's student (``dino.drop_path``).
    - ``fix_sincos_pos_embed(order)``: a fixed 2-D sin-cos position embedding instead of the learned
      one (MoCo v3's ``mocov3.pos_embed``, MAE's ``mae.pos_embed``); ``init_mocov3()``: MoCo v3's init
      (``mocov3.init``). Only the methods that ask call them: built, a ViT is torchvision's.
    - ``use_beit_blocks(layer_scale, rel_pos_bias)``: BEiT's transformer (``BEiTBlock``: layer scale, q / v
      biases, an additive attention bias) in place of torchvision's blocks, with ``rel_pos_bias``
      "shared" one ``RelPosBias`` for all blocks and no absolute position embedding (unilm's
      ``use_shared_rel_pos_bias``, ``use_abs_pos_emb`` False). torchvision's blocks stay for every other
      method: their state_dict layout is what the saved trunks, MoCo v3's init and the tests of the other
      ViT methods read. ``options`` records the choice; ``save_backbone`` stores it and ``load_backbone``
      rebuilds the same blocks. ``init_beit()`` / ``rescale_block_outputs()``: BEiT's trunc-normal(0.02)
      init and its 1 / sqrt(2 l) rescaling of each block's output projections; ``init_mae()``: MAE's
      xavier init. ``unshare_rel_pos_bias()``: a copy of the shared table in every block (what the
      official fine-tuning does with a pre-trained shared bias).
    - Differences from the papers' code: torchvision's init unless a method re-initialises it.
    """

    def __init__(self, in_channels: int, patch: int, dim: int, depth: int, heads: int, mlp_dim: int,
                 image_size: int):
        super().__init__()
        # imported here, as in _resnet (torchvision's import cost)
        from torchvision.models.vision_transformer import VisionTransformer

        side = max(image_size // patch, 1) * patch
        vit = VisionTransformer(image_size=side, patch_size=patch, num_layers=depth, num_heads=heads,
                                hidden_dim=dim, mlp_dim=mlp_dim)
        vit.heads = nn.Identity()  # the classification head removed: the output is the CLS token
        if in_channels != 3:
            conv = nn.Conv2d(in_channels, dim, patch, patch)
            nn.init.trunc_normal_(conv.weight, std=(1.0 / (in_channels * patch * patch)) ** 0.5)  # torchvision's
            nn.init.zeros_(conv.bias)
            vit.conv_proj = conv
        self.vit = vit
        self.blocks = nn.ModuleList(PatchMap() for _ in range(depth))
        self.patch, self.grid, self.image_size, self.out_dim = patch, side // patch, side, dim
        self.heads, self.mlp_dim = heads, mlp_dim
        self.rel_pos_bias: RelPosBias | None = None  # BEiT's shared relative position bias
        self.options: dict[str, Any] = {}  # how the blocks differ from torchvision's (use_beit_blocks)

    @property
    def patch_embed(self) -> nn.Conv2d:
        return self.vit.conv_proj

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth on every block's two residual branches, rising linearly from 0 at the first
        block to ``rate`` at the last (timm's ``torch.linspace(0, drop_path_rate, depth)``, the rule of
        DeiT, DINO, MAE and BEiT); 0 switches it off. Changes no parameter, so a saved trunk loads the
        same either way."""
        layers = self.vit.encoder.layers
        n = len(layers)
        for i, block in enumerate(layers):
            p = rate * i / (n - 1) if n > 1 else rate
            if isinstance(block, BEiTBlock):
                block.drop_path = DropPath(p)
                continue
            for parent, key in ((block, "dropout"), (block.mlp, "4")):
                old = parent._modules[key]
                parent._modules[key] = DropPath(p, old.dropout if isinstance(old, DropPath) else old.p)

    def fix_sincos_pos_embed(self, order: str) -> None:
        """Overwrite the position embedding with a fixed 2-D sin-cos table for the built g x g grid and
        stop its training (``requires_grad`` False: no gradient, and ``selfsup.engine.optim.param_groups`` /
        the methods' own groups skip it, so it is never decayed), as MoCo v3 (``vits.py``
        ``build_2d_sincos_position_embedding``) and MAE (``models_mae.py``: ``get_2d_sincos_pos_embed``,
        ``requires_grad=False``) keep theirs. ``order``: ``sincos_pos_embed``'s ``first`` ("h" MoCo v3,
        "w" MAE). It stays the parameter ``vit.encoder.pos_embedding``: a saved trunk loads into a plain
        ViT, and fine-tuning (which makes every parameter trainable) trains it from this table, as the
        official fine-tuning code trains the pos_embed it loads. Other input sizes resize it bicubically
        (``pos_embed``), as MAE's ``interpolate_pos_embed``."""
        pe = self.vit.encoder.pos_embedding  # (1, 1 + g g, D)
        table = sincos_pos_embed(self.out_dim, self.grid, self.grid, first=order)  # (1 + g g, D), CLS row 0
        if table.shape != pe.shape[1:]:
            raise RuntimeError(f"sin-cos table {tuple(table.shape)} does not match the position embedding "
                               f"{tuple(pe.shape)}")
        with torch.no_grad():
            pe.copy_(table[None])
        pe.requires_grad_(False)

    def init_mocov3(self) -> None:
        """MoCo v3's ViT init (facebookresearch/moco-v3 ``vits.py`` ``VisionTransformerMoCo.__init__``) on
        torchvision's modules: every Linear (attention output ``out_proj``, the MLP's two) xavier-uniform
        with zero bias; the fused q, k, v projection (torchvision's ``in_proj_weight`` (3 D, D), timm's
        ``qkv``) uniform in +-sqrt(6 / (3 D / 3 + D)), xavier's bound for one D x D matrix, "treat the
        weights of Q, K, V separately", zero bias; the CLS token N(0, 1e-6); the patch projection
        xavier-uniform on its flattened (D, C p p) weight, zero bias (the official bound writes C = 3:
        RGB; here the projection's own channels). LayerNorms keep weight 1, bias 0 (both codes)."""
        v = self.vit
        with torch.no_grad():
            for m in v.encoder.modules():
                if isinstance(m, nn.MultiheadAttention):
                    w = m.in_proj_weight  # (3 D, D); None if torch kept q, k, v apart (never for torchvision's)
                    if w is None or m.in_proj_bias is None:
                        raise RuntimeError("init_mocov3: expected torchvision's fused q, k, v projection with bias")
                    bound = math.sqrt(6.0 / (w.shape[0] // 3 + w.shape[1]))
                    nn.init.uniform_(w, -bound, bound)
                    nn.init.zeros_(m.in_proj_bias)
                elif isinstance(m, nn.Linear):  # out_proj (a Linear subclass) and mlp[0], mlp[3]
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            nn.init.normal_(v.class_token, std=1e-6)
            conv = v.conv_proj
            bound = math.sqrt(6.0 / (conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] + conv.out_channels))
            nn.init.uniform_(conv.weight, -bound, bound)
            nn.init.zeros_(conv.bias)

    def use_beit_blocks(self, layer_scale: float, rel_pos_bias: str) -> None:
        """BEiT's blocks (``BEiTBlock``, layer scale init ``layer_scale``, 0: none) in place of torchvision's,
        under the same names (``encoder.layers.encoder_layer_i``: fine-tuning's layer decay reads them);
        ``rel_pos_bias``: "shared" (one ``RelPosBias`` passed to every block, the absolute position
        embedding removed: unilm@768a3c8 ``run_beit_pretraining.py`` ``rel_pos_bias`` True, ``abs_pos_emb``
        False), "per_block" (each block its own table, no absolute embedding: the official fine-tuning)
        or "none" (torchvision's learned absolute embedding kept). Call it on a freshly built ViT."""
        if rel_pos_bias not in ("shared", "per_block", "none"):
            raise ValueError(f"rel_pos_bias: shared, per_block or none, got {rel_pos_bias!r}")
        layers = self.vit.encoder.layers
        for name in list(layers._modules):
            block = BEiTBlock(self.out_dim, self.heads, self.mlp_dim, layer_scale)
            if rel_pos_bias == "per_block":
                block.rel_pos_bias = RelPosBias(self.grid, self.heads)
            layers._modules[name] = block
        if rel_pos_bias == "shared":
            self.rel_pos_bias = RelPosBias(self.grid, self.heads)
        if rel_pos_bias != "none":
            self.vit.encoder.pos_embedding = None  # no absolute position embedding (registered as None)
        self.options = {"blocks": "beit", "layer_scale": float(layer_scale), "rel_pos_bias": rel_pos_bias}

    def unshare_rel_pos_bias(self) -> None:
        """Give each block a copy of the shared relative position bias and drop the shared one, as the
        official fine-tuning loads a pre-trained shared table (unilm@768a3c8 ``run_class_finetuning.py``:
        ``rel_pos_bias.relative_position_bias_table`` copied to ``blocks.i.attn.relative_position_bias_table``
        with ``--rel_pos_bias``, its default). The outputs are unchanged; afterwards the tables train apart."""
        if self.rel_pos_bias is None:
            return
        for block in self.vit.encoder.layers:
            own = RelPosBias(self.grid, self.heads).to(self.rel_pos_bias.relative_position_bias_table)
            with torch.no_grad():
                own.relative_position_bias_table.copy_(self.rel_pos_bias.relative_position_bias_table)
            block.rel_pos_bias = own
        self.rel_pos_bias = None
        self.options = {**self.options, "rel_pos_bias": "per_block"}

    def _linears(self) -> list[tuple[nn.Module, torch.Tensor]]:
        """(module, weight) of every Linear-like weight of the blocks: BEiT's qkv / proj / fc1 / fc2, or
        torchvision's fused ``in_proj_weight``, ``out_proj`` and the MLP's two Linears."""
        out = []
        for m in self.vit.encoder.layers.modules():
            if isinstance(m, nn.MultiheadAttention):
                out.append((m, m.in_proj_weight))
            elif isinstance(m, nn.Linear):
                out.append((m, m.weight))
        return out

    @torch.no_grad()
    def _init_linears_and_norms(self, weight_init: Any) -> None:
        """The common part of MAE's and BEiT's ``_init_weights``: every Linear weight of the blocks (and
        the attention in-projection) through ``weight_init``, its bias 0; every LayerNorm of the encoder
        weight 1 and bias 0. Linears first, then the norms (the order of the random draws)."""
        for m, w in self._linears():
            weight_init(w)
            bias = m.in_proj_bias if isinstance(m, nn.MultiheadAttention) else m.bias
            if bias is not None:
                nn.init.zeros_(bias)
        for m in self.vit.encoder.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def init_beit(self, std: float = 0.02) -> None:
        """BEiT's init (unilm@768a3c8 ``beit/modeling_pretrain.py``: ``trunc_normal_`` with a = -std, b = std,
        i.e. cut at one standard deviation, then ``_init_weights``): every Linear weight of the blocks and
        the patch projection trunc-normal(std) in [-std, std], their biases 0 (the q / v biases stay 0),
        LayerNorms weight 1 and bias 0, the CLS token (and an absolute position embedding, if kept)
        trunc-normal(std); the relative position bias stays 0 and the layer scale at its init."""
        v = self.vit
        with torch.no_grad():
            self._init_linears_and_norms(lambda w: nn.init.trunc_normal_(w, std=std, a=-std, b=std))
            nn.init.trunc_normal_(v.conv_proj.weight, std=std, a=-std, b=std)
            nn.init.zeros_(v.conv_proj.bias)
            nn.init.trunc_normal_(v.class_token, std=std, a=-std, b=std)
            if v.encoder.pos_embedding is not None and v.encoder.pos_embedding.requires_grad:
                nn.init.trunc_normal_(v.encoder.pos_embedding, std=std, a=-std, b=std)

    def rescale_block_outputs(self) -> None:
        """Divide the output projection of each block's attention and of its MLP by sqrt(2 l), l = 1 ... depth
        (BEiT sec. 2.5; unilm@768a3c8 ``modeling_pretrain.py`` ``fix_init_weight``: ``attn.proj`` and
        ``mlp.fc2``; torchvision's blocks: ``self_attention.out_proj`` and ``mlp[3]``)."""
        with torch.no_grad():
            for i, block in enumerate(self.vit.encoder.layers, start=1):
                outs = ((block.proj, block.fc2) if isinstance(block, BEiTBlock)
                        else (block.self_attention.out_proj, block.mlp[3]))
                for lin in outs:
                    lin.weight.div_(math.sqrt(2.0 * i))

    def init_mae(self) -> None:
        """MAE's init of the encoder (facebookresearch/mae@efb2a80 ``models_mae.py`` ``initialize_weights``):
        the patch projection xavier-uniform as a Linear on its flattened (D, C p p) weight, every Linear of
        the blocks xavier-uniform with bias 0 (timm's fused qkv Linear is one (3 D, D) matrix: torchvision's
        ``in_proj_weight`` gets the same bound), LayerNorms weight 1 and bias 0, the CLS token N(0, 0.02).
        The conv bias is left as built (zero: torchvision's init; the official code leaves PyTorch's)."""
        v = self.vit
        with torch.no_grad():
            self._init_linears_and_norms(nn.init.xavier_uniform_)
            w = v.conv_proj.weight  # (D, C, p, p)
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(v.class_token, std=0.02)

    def freeze_patch_embed(self) -> None:
        for p in self.vit.conv_proj.parameters():
            p.requires_grad_(False)

    def pos_embed(self, h: int, w: int) -> torch.Tensor:
        """(1, 1 + h w, D): the position embedding for an h x w patch grid; None without one (BEiT's
        relative position bias)."""
        pe = self.vit.encoder.pos_embedding  # (1, 1 + g g, D)
        g = self.grid
        if pe is None or (h, w) == (g, g):
            return pe
        grid = pe[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(pe.dtype)
        return torch.cat([pe[:, :1], grid.flatten(2).transpose(1, 2)], 1)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(B, C, H, W) -> ((B, 1 + h w, D) the first block's input: CLS + patch tokens + position; h; w)."""
        v = self.vit
        x = v.conv_proj(x)  # (B, D, h, w)
        b, _, h, w = x.shape
        x = torch.cat([v.class_token.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], 1)  # (B, 1 + h w, D)
        pe = self.pos_embed(h, w)
        return v.encoder.dropout(x if pe is None else x + pe), h, w

    def run_blocks(self, x: torch.Tensor, h: int, w: int, tap: bool = True) -> Iterator[torch.Tensor]:
        """The first block's input (B, 1 + h w, D) -> each block's output in turn, the BEiT blocks given
        the shared relative position bias (computed once per call, as unilm's ``forward_features``);
        ``tap``: through the probe points (``blocks``)."""
        bias = self.rel_pos_bias(h, w) if self.rel_pos_bias is not None else None  # (heads, N, N)
        for block, probe in zip(self.vit.encoder.layers, self.blocks):
            x = block(x, bias, (h, w)) if isinstance(block, BEiTBlock) else block(x)
            if tap:
                probe(x[:, 1:].transpose(1, 2).unflatten(2, (h, w)))  # probe point: (B, D, h, w)
            yield x

    def block_tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) -> every block's output (B, 1 + h w, D), first to last, before the final LayerNorm
        (BEiT's ``get_intermediate_layers``; DINO's applies the final norm to each: ``self.norm`` below)."""
        x, h, w = self.embed(x)
        return list(self.run_blocks(x, h, w))

    @property
    def norm(self) -> nn.LayerNorm:
        """The final LayerNorm (eps 1e-6), applied to the last block's tokens by ``tokens``."""
        return self.vit.encoder.ln

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(B, C, H, W) -> ((B, 1 + h w, D) tokens after the final LayerNorm, CLS first; h; w)."""
        x, h, w = self.embed(x)
        for x in self.run_blocks(x, h, w):
            pass
        return self.vit.encoder.ln(x), h, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, D)
        return self.tokens(x)[0][:, 0]  # the CLS token after the final LayerNorm

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D, H / patch, W / patch): the patch tokens after the final LayerNorm as one
        stride-``patch`` map (a plain single-scale detection backbone, as ViTDet's simplest)."""
        t, h, w = self.tokens(x)
        return t[:, 1:].transpose(1, 2).unflatten(2, (h, w))


def vit_trunk(net: nn.Module) -> ViT | None:
    """The ``ViT`` of a ``Backbone`` (or a bare trunk), None for the conv nets."""
    t = getattr(net, "trunk", net)
    return t if isinstance(t, ViT) else None


def require_vit(net: nn.Module, key: str, why: str) -> ViT:
    """The ``ViT`` of ``net`` for what works on a Vision Transformer only (MAE, BEiT, DINO's drop path,
    MoCo v3's frozen patch projection); otherwise a ConfigError naming ``key`` and saying ``why``."""
    vit = vit_trunk(net)
    if vit is None:
        got = getattr(net, "arch_name", "") or type(getattr(net, "trunk", net)).__name__
        raise ConfigError(f"{key}: {why}; it needs a Vision Transformer backbone ({', '.join(VITS)}), got {got}")
    return vit


def patch_grid(x: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, G, G, C, patch, patch): the overlapping patches of a square image, row by
    row, G = (S - patch) / stride + 1 (CPC's grid: van den Oord et al. 2018 sec. 3.3, 64 px patches
    on a 32 px pitch over 256 px, 7 x 7). ``stride`` must tile the side exactly."""
    s = x.shape[-1]
    if x.shape[-2] != s:
        raise ValueError(f"patch grid: the image must be square, got {tuple(x.shape[-2:])}")
    if not 0 < patch <= s or stride <= 0 or (s - patch) % stride:
        raise ValueError(f"patch grid: {patch} px patches on a {stride} px pitch do not tile {s} px")
    return x.unfold(2, patch, stride).unfold(3, patch, stride).permute(0, 2, 3, 1, 4, 5)


def grid_side(side: int, patch: int, stride: int) -> int:
    """Patches per row of ``patch_grid`` on a ``side`` px image."""
    return (side - patch) // stride + 1


def layer_norm_trunk(trunk: nn.Module) -> nn.Module:
    """Every batch norm of ``trunk`` replaced in place by a per-sample layer norm (CPC v2, Hénaff et al.
    2020 sec. 4.1: batch statistics tie the patches of a batch together, which the contrastive task can
    exploit): BatchNorm2d(C) -> GroupNorm(1, C) (mean and variance over C, H, W of each sample, an affine
    per channel), BatchNorm1d(C) -> LayerNorm(C). Weights 1, biases 0, as a fresh batch norm."""
    for name, m in list(trunk.named_children()):
        if isinstance(m, nn.BatchNorm2d):
            setattr(trunk, name, nn.GroupNorm(1, m.num_features, eps=m.eps))
        elif isinstance(m, nn.BatchNorm1d):
            setattr(trunk, name, nn.LayerNorm(m.num_features, eps=m.eps))
        else:
            layer_norm_trunk(m)
    return trunk


NORMS = ("batch", "layer")


class Backbone(nn.Module):
    """Optional input adapter (colourisation's L channel) + optional Sobel front end + trunk;
    ``out_dim`` and ``relu_head`` describe the output, ``in_channels`` the input it takes.

    ``grid`` ({"view", "patch", "stride"}, CPC's encoders): the image (after the front end) is resized
    to ``view`` px, cut into ``patch_grid`` patches, each encoded by the trunk, and the patch features
    are averaged: (B, D), the spatially mean-pooled patch features CPC's linear protocol reads (van
    den Oord et al. 2018 sec. 3.3). Hooks on the trunk see (B G G, ...) per-patch activations
    (``per_image`` averages them). Detection reads the trunk alone, on the whole image."""

    def __init__(self, trunk: nn.Module, out_dim: int, sobel: nn.Module | None, relu_head: bool,
                 adapter: nn.Module | None = None, adapter_spec: dict[str, Any] | None = None,
                 name: str = "", image_size: int | None = None, norm: str = "batch",
                 grid: dict[str, int] | None = None):
        super().__init__()
        self.adapter = adapter
        self.adapter_spec = adapter_spec
        self.sobel = sobel
        self.trunk = trunk
        self.out_dim = out_dim
        self.relu_head = relu_head
        # what save_backbone records to rebuild it: the backbone name, and for a ViT the image side its
        # position embedding was built for (None for the conv nets, which take any size); the norm
        # layers and the patch grid (CPC)
        self.arch_name = name
        self.image_size = image_size
        self.norm = norm
        self.grid = dict(grid) if grid else None

    def front(self) -> list[nn.Module]:
        """The fixed modules before the trunk, in order (adapter, Sobel)."""
        return [m for m in (self.adapter, self.sobel) if m is not None]

    @property
    def in_channels(self) -> int:
        if self.adapter is not None:
            return int(self.adapter.in_channels)
        if self.sobel is not None:
            return int(self.sobel.net[0].in_channels)
        return int(next(m for m in self.trunk.modules() if isinstance(m, nn.Conv2d)).in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.front():
            x = m(x)
        if self.grid is None:
            return self.trunk(x)
        g = self.grid
        if x.shape[-2:] != (g["view"], g["view"]):
            x = F.interpolate(x, size=(g["view"], g["view"]), mode="bilinear", align_corners=False,
                              antialias=True)
        b = len(x)
        f = self.trunk(patch_grid(x, g["patch"], g["stride"]).flatten(0, 2))  # (B G G, D)
        return f.view(b, -1, f.shape[-1]).mean(1)  # (B, D)


def per_image(act: torch.Tensor, b: int) -> torch.Tensor:
    """A hooked activation of a ``b``-image batch -> per image: a grid encoder's (b G G, ...) patch
    activations averaged over the patches; anything else as it is."""
    if act.shape[0] == b:
        return act
    return act.view(b, -1, *act.shape[1:]).mean(1)


def _resnet(name: str, in_channels: int, cifar_stem: bool) -> tuple[nn.Module, int]:
    # imported here: torchvision's import costs ~1.5 s per stage start (benchmarks/imports.py), and the
    # smallcnn / alexnet_bn stages never need it
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def build_backbone(name: str, in_channels: int, sobel: bool = False, image_size: int | None = None,
                   adapter: dict[str, Any] | None = None, key: str = "model.backbone",
                   vit: dict[str, Any] | None = None, norm: str = "batch",
                   grid: dict[str, int] | None = None) -> Backbone:
    """Build a backbone by name; ``image_size`` (min side) is checked against what it accepts (a ViT's
    position embedding is built for it; None: the ViT's default side, ``VITS``); ``adapter``: an input
    adapter spec (``ADAPTERS``), e.g. colourisation's L channel; ``key``: the params key errors name
    (``<method>.backbone`` for a method's own backbone); ``vit``: a ViT's ``options`` (BEiT's blocks),
    as ``save_backbone`` records them; ``norm``: ``layer`` swaps every batch norm for a per-sample layer
    norm (``layer_norm_trunk``); ``grid``: encode the image as CPC's mean-pooled patch grid (``Backbone``)."""
    if norm not in NORMS:
        raise ValueError(f"{key}: unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if name not in MIN_SIZE:
        raise ValueError(f"{key}: unknown backbone {name!r}; choose one of {', '.join(MIN_SIZE)}")
    if image_size is not None and image_size < MIN_SIZE[name]:
        raise ValueError(f"{key}: {name} needs images of at least {MIN_SIZE[name]} px, got {image_size}")
    adapt, in_channels = build_adapter(adapter, in_channels)
    groups = ADAPTERS[adapter["kind"]][2] if adapter is not None else None
    if groups is not None:  # one encoder per channel group (CMC's L and ab), each a ``name`` of its own
        if sobel:
            raise ValueError(f"{key}: the Sobel front end takes RGB, not the {adapter['kind']} views")
        if norm != "batch" or grid is not None:
            raise ValueError(f"{key}: the {adapter['kind']} views take neither a norm choice nor a patch grid")
        views = [build_backbone(name, len(g), image_size=image_size, key=key, vit=vit) for g in groups]
        trunk = SplitTrunk([v.trunk for v in views], groups, [v.out_dim for v in views])
        return Backbone(trunk, sum(trunk.dims), None, views[0].relu_head, adapt, adapter, name=name,
                        image_size=views[0].image_size)
    front = Sobel(in_channels) if sobel else None
    c = 2 if sobel else in_channels
    relu_head = False
    vit_side = None
    if name == "smallcnn":
        trunk: nn.Module = SmallCNN(c)
        dim = trunk.out_dim
    elif name in ("nin", "nin_rotnet"):
        trunk = NIN(c, avgpool_block3=name == "nin")
        dim = trunk.out_dim
    elif name in ALEXNETS:
        trunk = AlexNetBN(c, name)
        dim, relu_head = trunk.out_dim, trunk.relu_head
    elif name in VITS:
        patch, width, depth, heads, mlp_dim, default_side = VITS[name]
        trunk = ViT(c, patch, width, depth, heads, mlp_dim, image_size or default_side)
        if vit and vit.get("blocks") == "beit":
            trunk.use_beit_blocks(vit["layer_scale"], vit["rel_pos_bias"])
        dim, vit_side = trunk.out_dim, trunk.image_size
    else:
        trunk, dim = _resnet(name.replace("_cifar", ""), c, cifar_stem=name.endswith("_cifar"))
    if norm == "layer":
        if name in VITS:
            raise ValueError(f"{key}: {name} has layer norms already (norm: layer is for the conv nets)")
        layer_norm_trunk(trunk)
    if grid is not None and name in VITS:
        raise ValueError(f"{key}: a patch-grid encoder needs a conv net, not {name}")
    return Backbone(trunk, dim, front, relu_head, adapt, adapter, name=name, image_size=vit_side, norm=norm,
                    grid=grid)


def save_backbone(path: str | Path, method: Any, cfg: Any, meta: dict[str, Any]) -> None:
    """A method's backbone weights + what rebuilds its architecture (no method code needed to load)."""
    head = method.eval_head()
    t = getattr(method.cfg, "temperature", None)
    enc = method.encoder()
    # the name the encoder was built with (a method's own ``<m>.backbone`` or model.backbone)
    name = getattr(enc, "arch_name", "") or getattr(method.cfg, "backbone", "") or cfg.model.backbone
    arch = {"name": name, "sobel": bool(getattr(method.cfg, "sobel", False)),
            "in_channels": meta["channels"], "adapter": getattr(enc, "adapter_spec", None)}
    if getattr(enc, "image_size", None):  # a ViT: the side its position embedding was built for
        arch["image_size"] = int(enc.image_size)
    trunk = vit_trunk(enc)
    if trunk is not None and trunk.options:  # BEiT's blocks: load_backbone rebuilds them
        arch["vit"] = dict(trunk.options)
    if getattr(enc, "norm", "batch") != "batch":
        arch["norm"] = enc.norm
    if getattr(enc, "grid", None):
        arch["grid"] = dict(enc.grid)
    save_torch(path, {
        "backbone": {k: v.cpu() for k, v in enc.state_dict().items()},
        "arch": arch,
        "method": method.name,
        # the paper protocol's features (``EvalHead``) and the training temperature its kNN uses
        "eval_head": None if head is None else {"spec": head.spec,
                                                "state": {k: v.cpu() for k, v in head.state_dict().items()}},
        "temperature": None if t is None else float(t),
        # why the method did not train on this data ("" if it did): the evaluations skip it too
        "skipped": getattr(method, "skipped", "") or "",
    })


def skipped_reason(path: str | Path) -> str:
    """Why the method of a saved model file did not train ("" if it did): its evaluations would only
    repeat the untrained init's, so the evaluate and voc stages skip it and say why."""
    return str(load_torch(path).get("skipped") or "")


def load_backbone(path: str | Path, device: torch.device) -> torch.nn.Module:
    """A backbone file (``save_backbone``) -> the network in eval mode on ``device``."""
    ck = load_torch(path)
    try:
        a = ck["arch"]
        net = build_backbone(a["name"], a["in_channels"], a["sobel"], image_size=a.get("image_size"),
                             adapter=a.get("adapter"), vit=a.get("vit"), norm=a.get("norm", "batch"),
                             grid=a.get("grid"))
        net.load_state_dict(ck["backbone"])
    except (KeyError, RuntimeError, TypeError, IndexError) as e:  # TypeError / IndexError: not a dict at all
        raise InputError(f"{path}: not a backbone file of this version ({e})") from e
    return net.to(device).eval()


def load_eval_head(path: str | Path, device: torch.device) -> tuple[torch.nn.Module | None, float | None]:
    """(the saved ``EvalHead`` in eval mode or None, the method's training temperature or None)."""
    ck = load_torch(path)
    h = ck.get("eval_head")
    if h is None:
        return None, ck.get("temperature")
    try:
        head = EvalHead(h["spec"])
        head.load_state_dict(h["state"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise InputError(f"{path}: eval_head does not load ({e})") from e
    return head.to(device).eval(), ck.get("temperature")


def probe_points(backbone: nn.Module) -> dict[str, nn.Module]:
    """name -> the module whose output is that stage's activation, in forward order:
    AlexNet conv1-conv5 (the ReLU after each conv + BN), ResNet conv1 (stem) and layer1-layer4,
    smallcnn block1-block3 (the ReLU of each conv block), NIN block1-block4 (each block's output);
    a ``SplitTrunk`` (CMC): each stage of both encoders, concatenated."""
    if isinstance(backbone.trunk, SplitTrunk):
        return dict(backbone.trunk.joint.items())
    return _plain_probe_points(backbone.trunk)


def _plain_probe_points(trunk: nn.Module) -> dict[str, nn.Module]:
    if hasattr(trunk, "blocks"):  # RotNet's NIN: each block's output (after its pooling), as the paper evaluates
        return {f"block{i + 1}": b for i, b in enumerate(trunk.blocks)}
    if hasattr(trunk, "layer4"):  # torchvision ResNet
        return {"conv1": trunk.relu, **{f"layer{i}": getattr(trunk, f"layer{i}") for i in range(1, 5)}}
    seq = trunk.features if hasattr(trunk, "features") else trunk.net
    relus = [m for m in seq if isinstance(m, nn.ReLU)]
    prefix = "conv" if hasattr(trunk, "features") else "block"
    return {f"{prefix}{i + 1}": m for i, m in enumerate(relus)}

"""Backbones by name. Each returns an ``nn.Module`` mapping (B, C, H, W) -> (B, out_dim).

- ``smallcnn``: three conv-BN-ReLU blocks and global average pooling, sized for
  the embedded 8x8 digits on a CPU (128-d).
- ``resnet18_cifar``: torchvision ResNet-18 with the CIFAR stem (3x3 stride-1
  conv, no max-pool), as in InstDisc / MoCo's CIFAR demo (512-d); ``resnet50_cifar`` the same
  for ResNet-50 (2048-d: SimCLR's CIFAR-10 number is a ResNet-50 with this stem).
- ``resnet18`` / ``resnet50``: torchvision ResNets, ImageNet stem (512 / 2048-d).
- ``nin``: RotNet's CIFAR network (Gidaris et al. 2018): four network-in-network blocks, 192-d.
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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.heads import EvalHead
from selfsup.io import InputError, load_torch, save_torch

# smallest input side each backbone accepts (AlexNet's stride-4 stem and three
# 3x3/2 max-pools need >= 63 px)
MIN_SIZE = {"smallcnn": 4, "nin": 8, "resnet18_cifar": 8, "resnet50_cifar": 8, "resnet18": 32, "resnet50": 32, "alexnet_bn": 63}
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
        from selfsup.colour import rgb_to_lab

        rgb = (x.float() * self.std + self.mean).clamp(0.0, 1.0)
        return (rgb_to_lab(rgb)[:, :1] - 50.0).to(x.dtype)


ADAPTERS = {"lab_l": (LabL, 1)}  # kind -> (module class, channels it hands the trunk)


def build_adapter(spec: dict[str, Any] | None, in_channels: int) -> tuple[nn.Module | None, int]:
    """(the input adapter a spec describes or None, the channels the rest of the network sees)."""
    if spec is None:
        return None, in_channels
    kind = spec.get("kind")
    if kind not in ADAPTERS:
        raise ValueError(f"unknown input adapter {kind!r}; known: {', '.join(ADAPTERS)}")
    cls, out = ADAPTERS[kind]
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
    """RotNet's CIFAR-10 network (Gidaris et al. 2018, sec. 3 / the official NetworkInNetwork.py):
    ``blocks`` network-in-network blocks of three conv-BN-ReLU units (a k x k conv then two 1 x 1),
    192 channels (block 1: 192-160-96); a 3 x 3 / 2 max-pool after block 1, 3 x 3 / 2 average pools
    after blocks 2 and 3, global average pooling at the end (192-d). The paper's RotNet has 4 blocks
    and evaluates each block's output (``selfsup.probes``: block1-block4). The official init: He
    normal on the fan-out, BN weight 1 and bias 0 (torch's defaults for BN)."""

    def __init__(self, in_channels: int, blocks: int = 4):
        super().__init__()

        def unit(i: int, o: int, k: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, k, padding=(k - 1) // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        # (in, k x k out, 1 x 1 out, 1 x 1 out, k) per block
        spec = [(in_channels, 192, 160, 96, 5), (96, 192, 192, 192, 5)] + [(192, 192, 192, 192, 3)] * (blocks - 2)
        pools: list[list[nn.Module]] = [[nn.MaxPool2d(3, 2, 1)], [nn.AvgPool2d(3, 2, 1)]]
        pools += [[nn.AvgPool2d(3, 2, 1)] if blocks > 3 else []] + [[]] * (blocks - 3)
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
            x = b(x)  # block 1: (B, 96, H/2, W/2), block 2: (B, 192, H/4, W/4), block 3+: (B, 192, H/8, W/8)
        return self.pool(x)  # (B, 192)


class AlexNetBN(nn.Module):
    # (out_channels, kernel, stride, padding) or "M" for 3x3/2 max-pool, as in DeepCluster
    CFG = [(96, 11, 4, 2), "M", (256, 5, 1, 2), "M", (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1), "M"]

    def __init__(self, in_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(3, 2))
            else:
                o, k, s, p = v
                layers += [nn.Conv2d(c, o, k, s, p), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
                c = o
        self.features = nn.Sequential(*layers)
        # torchvision-style adaptive pool: identity at 224 px, lets other sizes >= 63 px work
        self.pool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
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
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))  # (B, 4096)


class PatchMap(nn.Identity):
    """A probe point of a ViT block: called with the block's patch tokens as a (B, D, h, w) map (a view,
    no copy) and returning it unchanged, so forward hooks (``selfsup.probes``) see a conv-like map."""


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
    - ``blocks``: one ``PatchMap`` per transformer block, the probe points ``selfsup.probes`` finds
      (block1 ... blockN: each block's patch tokens as a map).
    - ``set_drop_path(rate)``: stochastic depth (``DropPath``), used by the fine-tuning evaluation
      (``finetune.drop_path``: MAE's and BEiT's 0.1) and the pre-training of BEiT (``beit.drop_path``)
      and of DINO's student (``dino.drop_path``).
    - ``fix_sincos_pos_embed(order)``: a fixed 2-D sin-cos position embedding instead of the learned
      one (MoCo v3's ``mocov3.pos_embed``, MAE's ``mae.pos_embed``); ``init_mocov3()``: MoCo v3's init
      (``mocov3.init``). Only the methods that ask call them: built, a ViT is torchvision's.
    - Differences from the papers' code: torchvision's init unless a method re-initialises it (MAE's
      xavier init is not built).
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
            for parent, key in ((block, "dropout"), (block.mlp, "4")):
                old = parent._modules[key]
                parent._modules[key] = DropPath(p, old.dropout if isinstance(old, DropPath) else old.p)

    def fix_sincos_pos_embed(self, order: str) -> None:
        """Overwrite the position embedding with a fixed 2-D sin-cos table for the built g x g grid and
        stop its training (``requires_grad`` False: no gradient, and ``selfsup.optim.param_groups`` /
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

    def freeze_patch_embed(self) -> None:
        for p in self.vit.conv_proj.parameters():
            p.requires_grad_(False)

    def pos_embed(self, h: int, w: int) -> torch.Tensor:
        """(1, 1 + h w, D): the position embedding for an h x w patch grid."""
        pe = self.vit.encoder.pos_embedding  # (1, 1 + g g, D)
        g = self.grid
        if (h, w) == (g, g):
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
        return v.encoder.dropout(x + self.pos_embed(h, w)), h, w

    def block_tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) -> every block's output (B, 1 + h w, D), first to last, before the final LayerNorm
        (BEiT's ``get_intermediate_layers``; DINO's applies the final norm to each: ``self.norm`` below)."""
        x, h, w = self.embed(x)
        out = []
        for block, tap in zip(self.vit.encoder.layers, self.blocks):
            x = block(x)
            tap(x[:, 1:].transpose(1, 2).unflatten(2, (h, w)))
            out.append(x)
        return out

    @property
    def norm(self) -> nn.LayerNorm:
        """The final LayerNorm (eps 1e-6), applied to the last block's tokens by ``tokens``."""
        return self.vit.encoder.ln

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(B, C, H, W) -> ((B, 1 + h w, D) tokens after the final LayerNorm, CLS first; h; w)."""
        x, h, w = self.embed(x)
        for block, tap in zip(self.vit.encoder.layers, self.blocks):
            x = block(x)
            tap(x[:, 1:].transpose(1, 2).unflatten(2, (h, w)))  # probe point: (B, D, h, w)
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


class Backbone(nn.Module):
    """Optional input adapter (colourisation's L channel) + optional Sobel front end + trunk;
    ``out_dim`` and ``relu_head`` describe the output, ``in_channels`` the input it takes."""

    def __init__(self, trunk: nn.Module, out_dim: int, sobel: nn.Module | None, relu_head: bool,
                 adapter: nn.Module | None = None, adapter_spec: dict[str, Any] | None = None,
                 name: str = "", image_size: int | None = None):
        super().__init__()
        self.adapter = adapter
        self.adapter_spec = adapter_spec
        self.sobel = sobel
        self.trunk = trunk
        self.out_dim = out_dim
        self.relu_head = relu_head
        # what save_backbone records to rebuild it: the backbone name, and for a ViT the image side its
        # position embedding was built for (None for the conv nets, which take any size)
        self.arch_name = name
        self.image_size = image_size

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
        return self.trunk(x)


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
                   adapter: dict[str, Any] | None = None, key: str = "model.backbone") -> Backbone:
    """Build a backbone by name; ``image_size`` (min side) is checked against what it accepts (a ViT's
    position embedding is built for it; None: the ViT's default side, ``VITS``); ``adapter``: an input
    adapter spec (``ADAPTERS``), e.g. colourisation's L channel; ``key``: the params key errors name
    (``<method>.backbone`` for a method's own backbone)."""
    if name not in MIN_SIZE:
        raise ValueError(f"{key}: unknown backbone {name!r}; choose one of {', '.join(MIN_SIZE)}")
    if image_size is not None and image_size < MIN_SIZE[name]:
        raise ValueError(f"{key}: {name} needs images of at least {MIN_SIZE[name]} px, got {image_size}")
    adapt, in_channels = build_adapter(adapter, in_channels)
    front = Sobel(in_channels) if sobel else None
    c = 2 if sobel else in_channels
    relu_head = False
    vit_side = None
    if name == "smallcnn":
        trunk: nn.Module = SmallCNN(c)
        dim = trunk.out_dim
    elif name == "nin":
        trunk = NIN(c)
        dim = trunk.out_dim
    elif name == "alexnet_bn":
        trunk = AlexNetBN(c)
        dim, relu_head = trunk.out_dim, True
    elif name in VITS:
        patch, width, depth, heads, mlp_dim, default_side = VITS[name]
        trunk = ViT(c, patch, width, depth, heads, mlp_dim, image_size or default_side)
        dim, vit_side = trunk.out_dim, trunk.image_size
    else:
        trunk, dim = _resnet(name.replace("_cifar", ""), c, cifar_stem=name.endswith("_cifar"))
    return Backbone(trunk, dim, front, relu_head, adapt, adapter, name=name, image_size=vit_side)


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
    save_torch(path, {
        "backbone": {k: v.cpu() for k, v in enc.state_dict().items()},
        "arch": arch,
        "method": method.name,
        # the paper protocol's features (``EvalHead``) and the training temperature its kNN uses
        "eval_head": None if head is None else {"spec": head.spec,
                                                "state": {k: v.cpu() for k, v in head.state_dict().items()}},
        "temperature": None if t is None else float(t),
    })


def load_backbone(path: str | Path, device: torch.device) -> torch.nn.Module:
    """A backbone file (``save_backbone``) -> the network in eval mode on ``device``."""
    ck = load_torch(path)
    try:
        a = ck["arch"]
        net = build_backbone(a["name"], a["in_channels"], a["sobel"], image_size=a.get("image_size"),
                             adapter=a.get("adapter"))
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

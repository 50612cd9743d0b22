"""Visual tokenisers for BEiT (Bao et al., ICLR 2022, sec. 2.1.2): an image -> one discrete token per ViT patch.

The interface (``Tokenizer``): ``encode(x)`` maps normalised images (B, C, H, W) (the dataset's mean / std, as
every view of the training loop) to (B, h w) long token ids in [0, ``vocab_size``), row-major, with
h, w = H // ``patch``, W // ``patch``: the grid of a ViT with ``patch``-px patches on the same image (its
strided ``conv_proj`` also drops a remainder), so token i is the target of patch i. BEiT checks that the
tokeniser's ``patch`` equals its ViT's and its vocabulary its ``vocab``.

Two kinds (``TokenizerCfg.kind``):

- ``vq`` (default): a small VQ-VAE (van den Oord et al., NeurIPS 2017) trained by the pipeline
  (``train_tokenizer``). Encoder: a 3 x 3 conv, log2(patch) stride-2 4 x 4 convs (each exactly halves a
  side, floor, so the grid is H // patch as the ViT's), two residual blocks (ReLU, 3 x 3, ReLU, 1 x 1), a
  1 x 1 conv to the code dimension; the decoder mirrors it with stride-2 transposed convs and reconstructs
  the normalised image (MSE on the grid's pixels). Quantisation: the nearest codebook entry (L2), a
  straight-through gradient to the encoder, the commitment loss beta ||z_e - sg(e)||^2 (beta 0.25). The
  codebook is learnt by exponential moving averages of the assigned encoder outputs (the paper's appendix
  A.1 alternative to the codebook loss; decay ``decay`` 0.99, Laplace-smoothed counts), initialised from
  the first batch's encoder outputs; a code whose EMA count falls below ``reseed`` (assignments per batch)
  is re-seeded with a random encoder output of the current batch (dead codes are common on small data).
  Sizes are ours (the paper: 256 channels, K = 512 codes, 4 x 4 downsampling).
- ``dalle``: the DALL-E dVAE encoder BEiT uses (Ramesh et al. 2021; openai/DALL-E ``dall_e/encoder.py``):
  a 7 x 7 input conv, 4 groups of 2 residual blocks (n_hid 256 -> 512 -> 1024 -> 2048 channels, bottleneck
  n_out / 4, residual branch scaled by 1 / n_layers^2), 2 x 2 max-pools after groups 1-3 (8 x downsampling),
  ReLU + 1 x 1 conv to 8192 logits, token = argmax. Rebuilt here (``DalleEncoder``, the same parameter
  names) so the official weights load as a plain state_dict with ``torch.load(weights_only=True)``; nothing
  is downloaded. Convert the official ``encoder.pkl`` (a pickled module; needs ``pip install DALL-E``) once::

      python -c "import torch; torch.save(torch.load('encoder.pkl', map_location='cpu', weights_only=False).state_dict(), 'dalle_encoder.pt')"

  and set ``tokenizer.path: dalle_encoder.pt``. Input: BEiT feeds the tokeniser a second, 112 px view of
  the same crop (microsoft/unilm@768a3c8 ``beit/datasets.py`` ``DataAugmentationForBEiT``:
  ``--second_input_size 112``, ``--second_interpolation lanczos``) for its 14 x 14 grid. Here the crop the
  ViT sees has its dataset normalisation undone (the mean / std recorded in the file) and is resized to
  (8 h) x (8 w) px by ``resample``: "lanczos" (default: ``lanczos_resize``, PIL's Lanczos-3 filter, the
  official second interpolation; the result clamped to [0, 1] as PIL's 8-bit output) or "bilinear"
  (antialiased, this project's earlier view); then ``map_pixels`` ((1 - 2 eps) x + eps, eps 0.1), a
  grayscale image repeated to RGB. The official view is resampled from the original image's crop box; here
  from the training crop (one rendering per view comes from the data loader).
  The official encoder runs its convs in fp16 on GPUs; here fp32.

The file (``save_tokenizer`` / ``load_tokenizer``): ``{"kind", "spec", "state_dict", "metrics"}``, plain
tensors and Python values only, so it loads with ``weights_only=True``.
"""
from __future__ import annotations

import math
import pickle
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from selfsup.core.config import ConfigError
from selfsup.models.config import TokenizerCfg
from selfsup.core.io import InputError, derive_seed, save_torch

KINDS = ("vq", "dalle")
LOGIT_LAPLACE_EPS = 0.1  # DALL-E's map_pixels
DALLE_DOWNSAMPLE = 8  # three 2 x 2 max-pools


# --------------------------------------------------------------------------- config
def tokenizer_cfg(raw: dict[str, Any] | None) -> TokenizerCfg:
    """The ``tokenizer:`` block -> a checked ``TokenizerCfg`` (unknown keys and bad types: ConfigError
    naming ``tokenizer.<key>``)."""
    from selfsup.core.config import build

    return build(TokenizerCfg, raw or {}, "tokenizer")


def check_patch_against(tok: TokenizerCfg, raw_params: dict[str, Any]) -> None:
    """``tokenizer.patch`` must equal the patch of the ViT BEiT trains (``beit.backbone``, else
    ``model.backbone``) when params.yaml names one."""
    from selfsup.models.backbones import VITS

    beit = raw_params.get("beit") or {}
    name = beit.get("backbone") or (raw_params.get("model") or {}).get("backbone", "")
    if name in VITS and VITS[name][0] != tok.patch:
        raise ConfigError(f"tokenizer.patch: {tok.patch} px, but BEiT's backbone {name} has {VITS[name][0]} px "
                          f"patches (one token per patch)")


# --------------------------------------------------------------------------- the interface
class Tokenizer(nn.Module):
    """Normalised images (B, C, H, W) -> (B, h w) token ids (``encode``); frozen after training."""

    kind: str = ""

    def __init__(self, patch: int, vocab_size: int, channels: int, mean: list[float], std: list[float]):
        super().__init__()
        self.patch, self.vocab_size, self.channels = int(patch), int(vocab_size), int(channels)
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]

    def grid(self, h: int, w: int) -> tuple[int, int]:
        """The token grid of an h x w image: the ViT's patch grid."""
        return h // self.patch, w // self.patch

    def logits_or_ids(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised -> (B, h, w) token ids; each kind implements it."""
        raise NotImplementedError(f"{type(self).__name__} must implement logits_or_ids()")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised -> (B, h w) long ids in [0, vocab_size), fp32 whatever the autocast."""
        if x.shape[1] != self.channels:
            raise ValueError(f"tokenizer: built for {self.channels}-channel images, got {x.shape[1]}")
        gh, gw = self.grid(x.shape[2], x.shape[3])
        if gh < 1 or gw < 1:
            raise ValueError(f"tokenizer: {tuple(x.shape[2:])} px images are smaller than one {self.patch} px patch")
        with torch.autocast(x.device.type, enabled=False):
            ids = self.logits_or_ids(x.float())  # (B, h, w)
        assert ids.shape[1:] == (gh, gw), (ids.shape, gh, gw)
        return ids.flatten(1).long()

    def spec(self) -> dict[str, Any]:
        return {"patch": self.patch, "vocab_size": self.vocab_size, "channels": self.channels,
                "mean": self.mean, "std": self.std}


# --------------------------------------------------------------------------- vq
class _Res(nn.Module):
    """van den Oord et al.'s residual block: x + conv1x1(relu(conv3x3(relu(x))))."""

    def __init__(self, c: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class VQTokenizer(Tokenizer):
    kind = "vq"

    def __init__(self, patch: int, vocab_size: int, channels: int, mean: list[float], std: list[float],
                 hidden: int = 128, dim: int = 64):
        super().__init__(patch, vocab_size, channels, mean, std)
        self.hidden, self.dim = int(hidden), int(dim)
        steps = round(math.log2(patch))
        if 2 ** steps != patch:
            raise ValueError(f"vq tokenizer: patch must be a power of 2, got {patch}")
        h = hidden
        enc: list[nn.Module] = [nn.Conv2d(channels, h, 3, padding=1)]
        for _ in range(steps):  # k4 s2 p1: floor(side / 2), the ViT's floor(side / patch) after all of them
            enc += [nn.ReLU(), nn.Conv2d(h, h, 4, 2, 1)]
        enc += [_Res(h), _Res(h), nn.ReLU(), nn.Conv2d(h, dim, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(dim, h, 3, padding=1), _Res(h), _Res(h)]
        for _ in range(steps):
            dec += [nn.ReLU(), nn.ConvTranspose2d(h, h, 4, 2, 1)]
        dec += [nn.ReLU(), nn.Conv2d(h, channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        # the codebook and its EMA statistics (buffers: learnt by moving averages, not by the optimiser)
        self.register_buffer("codebook", torch.randn(vocab_size, dim) * 0.1)
        self.register_buffer("ema_count", torch.zeros(vocab_size))
        self.register_buffer("ema_sum", torch.zeros(vocab_size, dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "hidden": self.hidden, "dim": self.dim}

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(N, dim) -> (N,) index of the nearest codebook entry (squared L2)."""
        e = self.codebook
        d = z.pow(2).sum(1, keepdim=True) - 2 * z @ e.t() + e.pow(2).sum(1)[None]  # (N, K)
        return d.argmin(1)

    def logits_or_ids(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)  # (B, dim, h, w)
        b, d, h, w = z.shape
        return self.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction (B, C, h p, w p), z_e (N, dim), ids (N,), commitment loss)."""
        z = self.encoder(x)  # (B, dim, h, w)
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (N, dim), N = B h w
        ids = self.nearest(flat.detach())
        q = self.codebook[ids]  # (N, dim)
        commit = F.mse_loss(flat, q)  # ||z_e - sg(e)||^2 (the codebook is a buffer: no gradient)
        st = flat + (q - flat).detach()  # straight-through: the decoder's gradient goes to z_e
        rec = self.decoder(st.view(b, h, w, d).permute(0, 3, 1, 2))
        return rec, flat, ids, commit

    @torch.no_grad()
    def update_codebook(self, flat: torch.Tensor, ids: torch.Tensor, decay: float, reseed: float,
                        g: torch.Generator) -> int:
        """EMA codebook update from this batch's encoder outputs ``flat`` (N, dim) and assignments; codes
        with an EMA count below ``reseed`` take random batch outputs. Returns how many were re-seeded."""
        k = self.vocab_size
        flat = flat.detach().float()
        if not bool(self.initialised):  # data init: the first batch's outputs (with replacement if N < K)
            pick = torch.randint(0, len(flat), (k,), generator=g).to(flat.device)
            self.codebook.copy_(flat[pick])
            self.ema_sum.copy_(flat[pick])
            self.ema_count.fill_(1.0)
            self.initialised.fill_(True)
            return 0
        onehot = F.one_hot(ids, k).to(flat.dtype)  # (N, K)
        self.ema_count.mul_(decay).add_(onehot.sum(0), alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(onehot.t() @ flat, alpha=1 - decay)
        n = self.ema_count.sum()
        count = (self.ema_count + 1e-5) / (n + k * 1e-5) * n  # Laplace smoothing (no division by 0)
        self.codebook.copy_(self.ema_sum / count[:, None])
        dead = (self.ema_count < reseed).nonzero().flatten() if reseed > 0 else ids.new_zeros(0)
        if len(dead):
            pick = torch.randint(0, len(flat), (len(dead),), generator=g).to(flat.device)
            self.codebook[dead] = flat[pick]
            self.ema_sum[dead] = flat[pick]
            self.ema_count[dead] = 1.0
        return len(dead)


# --------------------------------------------------------------------------- dalle
class _Conv(nn.Module):
    """DALL-E's ``Conv2d``: parameters ``w`` (out, in, k, k) and ``b`` (out,), 'same' padding."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
        self.b = nn.Parameter(torch.zeros(n_out))
        self.pad = (kw - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=self.pad)


class _DalleBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        hid = n_out // 4
        self.post_gain = 1.0 / n_layers ** 2
        self.id_path = _Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", _Conv(n_in, hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", _Conv(hid, hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", _Conv(hid, hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", _Conv(hid, n_out, 1))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """DALL-E's dVAE encoder (``dall_e/encoder.py``: group_count 4, n_blk_per_group 2), parameter names as
    the official module's state_dict (``blocks.input.w``, ``blocks.group_1.block_1.res_path.conv_1.w``, ...,
    ``blocks.output.conv.w``). (B, 3, H, W) mapped pixels -> (B, vocab, H / 8, W / 8) logits."""

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, input_channels: int = 3, vocab_size: int = 8192):
        super().__init__()
        self.n_hid, self.n_blk_per_group, self.input_channels, self.vocab_size = \
            n_hid, n_blk_per_group, input_channels, vocab_size
        n_layers = 4 * n_blk_per_group
        widths = [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]  # into group 1, out of groups 1-4

        def group(i: int) -> nn.Sequential:
            blocks = [(f"block_{j + 1}", _DalleBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1], n_layers))
                      for j in range(n_blk_per_group)]
            pool = [("pool", nn.MaxPool2d(kernel_size=2))] if i < 3 else []
            return nn.Sequential(OrderedDict(blocks + pool))

        self.blocks = nn.Sequential(OrderedDict([
            ("input", _Conv(input_channels, n_hid, 7)),
            *[(f"group_{i + 1}", group(i)) for i in range(4)],
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", _Conv(8 * n_hid, vocab_size, 1))]))),
        ]))

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "DalleEncoder":
        """Sizes read off the official weights (n_hid, blocks per group, vocabulary), then loaded."""
        n_hid, c_in = sd["blocks.input.w"].shape[:2]
        vocab = sd["blocks.output.conv.w"].shape[0]
        per_group = len({k.split(".")[2] for k in sd if k.startswith("blocks.group_1.block_")})
        enc = cls(int(n_hid), per_group, int(c_in), int(vocab))
        enc.load_state_dict(sd)
        return enc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


RESAMPLES = ("lanczos", "bilinear")


def _lanczos3(x: torch.Tensor) -> torch.Tensor:
    """PIL's lanczos filter: sinc(x) sinc(x / 3) on [-3, 3), 0 outside (float64 in, float64 out)."""
    def sinc(t: torch.Tensor) -> torch.Tensor:
        pt = math.pi * t
        return torch.where(t == 0, torch.ones_like(t), torch.sin(pt) / torch.where(t == 0, torch.ones_like(pt), pt))

    return torch.where((x >= -3.0) & (x < 3.0), sinc(x) * sinc(x / 3.0), torch.zeros_like(x))


def lanczos_weights(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) float64 resampling matrix of PIL's ``Image.resize(..., LANCZOS)`` along one axis
    (``ImagingResample``'s ``precompute_coeffs``): output pixel i centred at (i + 0.5) scale in input
    pixels, the filter widened by the downscale factor (antialiasing; support 3 x max(scale, 1)), taps
    from int(centre - support + 0.5) to int(centre + support + 0.5) clipped to the image, each weighted
    lanczos((j - centre + 0.5) / max(scale, 1)), then normalised to sum 1."""
    scale = in_size / out_size
    fs = max(scale, 1.0)
    support = 3.0 * fs
    w = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), in_size)
        j = torch.arange(lo, hi, dtype=torch.float64)
        k = _lanczos3((j - centre + 0.5) / fs)
        w[i, lo:hi] = k / k.sum()
    return w


def lanczos_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, *size): PIL's Lanczos-3 resize as two separable matrix products,
    horizontal then vertical (PIL's order), in float (PIL rounds to 8 bits between and after the
    passes; not done here)."""
    wy = lanczos_weights(x.shape[2], size[0]).to(x)  # (Sh, H)
    wx = lanczos_weights(x.shape[3], size[1]).to(x)  # (Sw, W)
    return torch.matmul(wy, torch.matmul(x, wx.t()))  # (B, C, Sh, Sw)


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """DALL-E's input mapping of [0, 1] pixels into [eps, 1 - eps]."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


class DalleTokenizer(Tokenizer):
    kind = "dalle"

    def __init__(self, patch: int, channels: int, mean: list[float], std: list[float], encoder: DalleEncoder):
        super().__init__(patch, encoder.vocab_size, channels, mean, std)
        if channels not in (1, 3):
            raise ValueError(f"dalle tokenizer: RGB or grayscale images, got {channels} channels")
        self.encoder = encoder
        # the second view's interpolation (RESAMPLES); BEiT sets it from beit.tokenizer_view, not saved
        self.resample = "lanczos"
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, -1, 1, 1), persistent=False)

    def spec(self) -> dict[str, Any]:
        e = self.encoder
        return {**super().spec(), "n_hid": e.n_hid, "n_blk_per_group": e.n_blk_per_group,
                "input_channels": e.input_channels}

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (B, C, H, W) -> the encoder's input (B, 3, 8 h, 8 w): resized, unnormalised, mapped."""
        gh, gw = self.grid(x.shape[2], x.shape[3])
        x = x[:, :, :gh * self.patch, :gw * self.patch]  # the ViT's patches only
        size = (gh * DALLE_DOWNSAMPLE, gw * DALLE_DOWNSAMPLE)
        if self.resample not in RESAMPLES:
            raise ValueError(f"dalle tokenizer: resample must be one of {RESAMPLES}, got {self.resample!r}")
        rgb = x * self._std + self._mean  # (B, C, H, W) pixels in [0, 1]
        if tuple(x.shape[2:]) != size:
            if self.resample == "lanczos":
                rgb = lanczos_resize(rgb, size)
            else:
                rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False, antialias=True)
        rgb = rgb.clamp(0.0, 1.0)
        if rgb.shape[1] == 1:
            rgb = rgb.expand(-1, 3, -1, -1)
        return map_pixels(rgb)

    def logits_or_ids(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.pixels(x)).argmax(1)  # (B, h, w)


def dalle_tokenizer(weights: str | Path, patch: int, channels: int, mean: list[float], std: list[float]
                    ) -> DalleTokenizer:
    """A user's DALL-E encoder state_dict file -> the tokeniser (InputError naming the file if it is not one)."""
    path = Path(weights)
    if not path.is_file():
        raise InputError(f"{path}: DALL-E encoder weights not found (tokenizer.path; see selfsup/models/tokenizer.py "
                         f"for the one-line conversion of the official encoder.pkl)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd and not any(k.startswith("blocks.") for k in sd):
            sd = sd["state_dict"]
        enc = DalleEncoder.from_state_dict(sd)
    except (KeyError, RuntimeError, TypeError, AttributeError, IndexError, ValueError) as e:
        raise InputError(f"{path}: not a DALL-E encoder state_dict ({type(e).__name__}: {e})") from e
    return DalleTokenizer(patch, channels, mean, std, enc)


# --------------------------------------------------------------------------- files
def save_tokenizer(path: str | Path, tok: Tokenizer, metrics: dict[str, Any] | None = None) -> None:
    """Atomic, byte-reproducible (``selfsup.core.io.save_torch``); loads with weights_only=True. The file keeps
    the metrics that the weights determine, not the run's ``seconds``: the same training writes the same
    bytes, so BEiT's run key (which hashes this file) holds when the tokenizer stage re-runs unchanged."""
    save_torch(path, {"kind": tok.kind, "spec": tok.spec(),
                      "state_dict": {k: v.detach().cpu() for k, v in tok.state_dict().items()},
                      "metrics": {k: float(v) for k, v in (metrics or {}).items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seconds"}})


def load_tokenizer(path: str | Path, device: torch.device | str = "cpu") -> Tokenizer:
    """A tokeniser file -> the frozen tokeniser in eval mode on ``device`` (InputError naming the file)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: tokeniser file missing (run the tokenizer stage: `dvc repro tokenizer`)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        kind, s, sd = ck["kind"], ck["spec"], ck["state_dict"]
        base = (s["patch"], s["channels"], s["mean"], s["std"])
        if kind == "vq":
            tok: Tokenizer = VQTokenizer(s["patch"], s["vocab_size"], s["channels"], s["mean"], s["std"],
                                         s["hidden"], s["dim"])
        elif kind == "dalle":
            enc = DalleEncoder(s["n_hid"], s["n_blk_per_group"], s["input_channels"], s["vocab_size"])
            tok = DalleTokenizer(*base, enc)
        else:
            raise KeyError(f"kind {kind!r}")
        tok.load_state_dict(sd)
    except (KeyError, RuntimeError, TypeError, IndexError, ValueError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise InputError(f"{path}: not a tokeniser file of this version ({type(e).__name__}: {e})") from e
    return freeze(tok.to(device))


def freeze(tok: Tokenizer) -> Tokenizer:
    for p in tok.parameters():
        p.requires_grad_(False)
    return tok.eval()


# --------------------------------------------------------------------------- training (vq)
def _usage(counts: np.ndarray) -> tuple[float, int]:
    """(perplexity exp(H(code histogram)), codes used) of a histogram of assignments."""
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    return float(np.exp(-(nz * np.log(nz)).sum())), int((counts > 0).sum())


def train_tokenizer(data: Any, cfg: TokenizerCfg, device: torch.device, seed: int | None = None,
                    run: Any = None) -> tuple[VQTokenizer, dict[str, Any]]:
    """Train the ``vq`` tokeniser on the training split's augmented views (random resized crops of
    ``crop_scale``, flips if ``flip``; the training loop's loader and device augmentation through
    ``selfsup.engine.loop.batch_maker``). ``seed``: default ``cfg.seed``; ``run``: the pipeline Config (workers,
    eval geometry; default: its defaults). Returns (the frozen tokeniser, metrics: per-epoch ``history``
    and the final reconstruction MSE / perplexity / codes used on the training views and on the test
    split's eval transform)."""
    from selfsup.augment.batched import ViewSpec
    from selfsup.core.config import Config
    from selfsup.models.features import extract_features
    from selfsup.data.batches import batch_maker

    if cfg.kind != "vq":
        raise ConfigError(f"tokenizer.kind: train_tokenizer trains the vq tokeniser, got {cfg.kind}")
    run = run if run is not None else Config()
    seed = cfg.seed if seed is None else seed
    t0 = time.perf_counter()
    meta = data.meta
    torch.manual_seed(derive_seed(seed, "tokenizer-init"))
    tok = VQTokenizer(cfg.patch, cfg.vocab, meta["channels"], meta["mean"], meta["std"], cfg.hidden, cfg.dim).to(device)
    side = min(data.fixed_size) if data.fixed_size else run.dataset.crop_size
    if side < cfg.patch:
        raise ConfigError(f"tokenizer.patch: {cfg.patch} px patches do not fit the {side} px training views")
    opt = torch.optim.Adam([p for p in tok.parameters() if p.requires_grad], lr=cfg.lr)
    spec = ViewSpec(count=1, size=0, crop=True, scale=tuple(cfg.crop_scale), flip_p=0.5 if cfg.flip else 0.0)
    make = batch_maker(run, data, device)
    g = torch.Generator().manual_seed(derive_seed(seed, "tokenizer-codes"))
    per_epoch = -(-data.n_train // cfg.batch_size)
    history: list[dict[str, float]] = []
    bar = tqdm(total=cfg.epochs * per_epoch, desc="tokenizer (vq)", unit="batch", leave=False, mininterval=2)
    tok.train()
    for ep in range(cfg.epochs):
        sums = {"mse": 0.0, "commit": 0.0, "reseeded": 0.0}
        counts = np.zeros(cfg.vocab, np.int64)
        nb = 0
        for batch in make([spec], derive_seed(seed, "tokenizer", ep), cfg.batch_size):
            x = batch.x.float()
            rec, flat, ids, commit = tok(x)
            gh, gw = tok.grid(x.shape[2], x.shape[3])
            mse = F.mse_loss(rec, x[:, :, :gh * cfg.patch, :gw * cfg.patch])
            loss = mse + cfg.beta * commit
            if not torch.isfinite(loss):
                raise FloatingPointError(f"tokenizer: loss is {loss.item()} at epoch {ep + 1} (lower tokenizer.lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums["reseeded"] += tok.update_codebook(flat, ids, cfg.decay, cfg.reseed, g)
            sums["mse"] += float(mse.detach())
            sums["commit"] += float(commit.detach())
            counts += np.bincount(ids.cpu().numpy(), minlength=cfg.vocab)
            nb += 1
            bar.update(1)
            bar.set_postfix(mse=f"{float(mse.detach()):.4f}", refresh=False)
        ppl, used = _usage(counts)
        history.append({"epoch": ep + 1, "mse": sums["mse"] / max(nb, 1), "commit": sums["commit"] / max(nb, 1),
                        "perplexity": ppl, "used_codes": used, "reseeded": sums["reseeded"]})
    bar.close()
    freeze(tok)

    def per_image(x: torch.Tensor) -> torch.Tensor:  # (B, 1 + h w): reconstruction MSE, then the ids
        rec, _, ids, _ = tok(x)
        gh, gw = tok.grid(x.shape[2], x.shape[3])
        err = (rec - x[:, :, :gh * cfg.patch, :gw * cfg.patch]).pow(2).flatten(1).mean(1)
        return torch.cat([err[:, None], ids.view(len(x), -1).float()], 1)

    with torch.no_grad():
        out = extract_features(per_image, data.test, meta, device, desc="tokenizer test",
                               workers=run.workers, resize=run.dataset.resize_size, crop=run.dataset.crop_size)
    t_ppl, t_used = _usage(np.bincount(out[:, 1:].astype(np.int64).ravel(), minlength=cfg.vocab))
    last = history[-1]
    metrics = {"kind": "vq", "vocab": cfg.vocab, "patch": cfg.patch, "epochs": cfg.epochs,
               "first_mse": history[0]["mse"], "final_mse": last["mse"], "final_perplexity": last["perplexity"],
               "final_used_codes": last["used_codes"], "test_mse": float(out[:, 0].mean()),
               "test_perplexity": t_ppl, "test_used_codes": t_used, "seconds": time.perf_counter() - t0,
               "history": history}
    return tok, metrics


def make_tokenizer(data: Any, cfg: TokenizerCfg, device: torch.device, run: Any = None
                   ) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer stage's work: train the vq tokeniser, or wrap the DALL-E weights (with this dataset's
    normalisation, to undo it)."""
    if cfg.kind == "vq":
        return train_tokenizer(data, cfg, device, cfg.seed, run)
    m = data.meta
    tok = freeze(dalle_tokenizer(cfg.path, cfg.patch, m["channels"], m["mean"], m["std"]).to(device))
    return tok, {"kind": "dalle", "vocab": tok.vocab_size, "patch": cfg.patch}

"""CMC: contrastive multiview coding (Tian, Krishnan, Isola; ECCV 2020), the L / ab version of the
paper's ImageNet experiments (sec. 4.2), as the official code (HobbitLong/CMC, ``train_CMC.py``,
``NCE/NCEAverage.py``, ``NCE/NCECriterion.py``) does it.

- Two views of one image: the L channel and the ab channels of CIE Lab (official ``RGB2Lab`` and its
  normalisation). The encoder is a ``SplitTrunk`` behind the ``lab_views`` input adapter
  (``selfsup.models.backbones``): one network of ``<backbone>`` per view, so the saved encoder takes
  RGB like any other and its features are both encoders' features concatenated (the paper's
  linear protocol, sec. 4.2). Official: the two halves of one AlexNet (``MyAlexNetCMC``, each half
  the channels) or ResNets of width x0.5 / x1 / x2 per view (``resnet50v1/v2/v3``); here each view
  is a full ``<backbone>`` (declared in the presets' ledger).
- Each view's features go through a linear layer to ``dim`` (official ``feat_dim`` 128; AlexNet's
  fc8) and are L2-normalised. Two memory banks (``MemoryBank``), one per view, hold one embedding per
  training image. The L embedding is scored against the ab bank and the ab embedding against the L
  bank, at the image's own entry (the positive) and at ``nce_k`` entries drawn uniformly (the same
  draw for both, as the official ``NCEAverage``); scores exp(v^T f / T).
- ``loss: nce`` (official default): NCE (InstDisc's, ``selfsup.losses.nce``) on each view's scores,
  with its Z (one per view) estimated on the first batch and then fixed; ``loss: softmax``
  (official ``--softmax``): cross-entropy of the positive among the 1 + ``nce_k`` scores. The loss
  is the sum of the two views' (sec. 3.2, "symmetric" L(V1, V2) = L_V1 + L_V2).
- After the step the bank entries of the batch become normalise(m v + (1 - m) f), m = 0.5
  (official ``nce_m``).

Defaults are the official ``train_CMC.py`` (AlexNet on ImageNet): SGD lr 0.03, momentum 0.9, weight
decay 1e-4, batch 128, 240 epochs with lr x0.1 at epochs 120, 160 and 200 (official
``adjust_learning_rate``, once per epoch), ``nce_k`` 16384, T 0.07, RandomResizedCrop(scale
0.2-1; 0.08-1 for the ResNets) + horizontal flip, no colour augmentation (the views are the colour).
A grayscale dataset (the digits default) has one view only: the method is skipped with its reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from selfsup.core import dist
from selfsup.core.config import ConfigError, one_of, positive
from selfsup.data.prepared import Data
from selfsup.engine.config import TrainCfg
from selfsup.engine.contract import Batch, Method, StepOut
from selfsup.losses.nce import estimate_z, nce_loss
from selfsup.methods import register
from selfsup.models.backbones import SplitTrunk
from selfsup.models.heads import EvalHead, l2n, projection_head
from selfsup.models.memory_bank import MEMORY_INITS, MemoryBank

CMC_LOSSES = ("nce", "softmax")


@dataclass
class CMCCfg(TrainCfg):
    # official train_CMC.py optimisation
    epochs: int = 240
    batch_size: int = 128
    lr: float = 0.03
    weight_decay: float = 1e-4
    lr_schedule: str = "step"
    schedule_unit: str = "epoch"  # official adjust_learning_rate: once per epoch
    lr_steps: list[int] = field(default_factory=lambda: [120, 160, 200])
    augment: str = "crop_flip"
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # official crop_low (AlexNet)
    # the method
    dim: int = 128  # official feat_dim
    loss: str = "nce"  # nce (official default) | softmax (official --softmax)
    nce_k: int = 16384  # negatives per image and view
    temperature: float = 0.07  # official nce_t
    memory_momentum: float = 0.5  # official nce_m
    memory_init: str = "uniform"  # official: U[-stdv, stdv] per coordinate

    def check(self, p: str) -> None:
        super().check(p)
        positive(p, self, "dim", "nce_k", "temperature")
        one_of(p, "loss", self.loss, CMC_LOSSES)
        one_of(p, "memory_init", self.memory_init, MEMORY_INITS)
        if not 0.0 <= self.memory_momentum < 1.0:
            raise ConfigError(f"{p}.memory_momentum: must be in [0, 1), got {self.memory_momentum}")
        if self.sobel:
            raise ConfigError(f"{p}.sobel: CMC's views are the Lab channels; the Sobel front end would drop them")


def cmc_scores(f: torch.Tensor, memory: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """v^T f / T for each sample's entries ``ids`` of the other view's bank: (B, 1 + K) logits.
    f: (B, D) unit embeddings of one view; memory: (N, D) the other view's bank; ids: (B, 1 + K),
    column 0 the sample's own entry (the positive)."""
    return torch.einsum("bkd,bd->bk", memory[ids], f) / temperature


@register
class CMC(Method):
    name = "cmc"
    Config = CMCCfg

    def __init__(self, backbone: Any, cfg: CMCCfg, num_classes: int, n_train: int = 0):
        super().__init__(backbone, cfg, num_classes)
        self.dims = list(backbone.trunk.dims) if isinstance(backbone.trunk, SplitTrunk) else [backbone.out_dim]
        # one linear layer per view, to the embedding (official: each half's last fc)
        self.heads = torch.nn.ModuleList(projection_head("linear", d, cfg.dim) for d in self.dims)
        self.n = n_train
        # seeded from the global RNG, which build_method seeds from the run seed
        seeds = torch.randint(2**31 - 1, (2,))
        self.banks = torch.nn.ModuleList(MemoryBank(n_train, cfg.dim, int(s), cfg.memory_init) for s in seeds)
        # the NCE constants Z of the L and ab scores, estimated on the first batch (0: not yet); a
        # buffer, so that a resumed run keeps them
        self.register_buffer("z", torch.zeros(2, dtype=torch.float64))
        self._z_known = False
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (idx, f_l, f_ab)

    @classmethod
    def input_adapter(cls, cfg: CMCCfg, meta: dict[str, Any]) -> dict[str, Any] | None:
        if meta["channels"] != 3:  # grayscale: skipped (skip_reason), the backbone stays a plain one
            return None
        return {"kind": "lab_views", "mean": [float(v) for v in meta["mean"]], "std": [float(v) for v in meta["std"]]}

    @classmethod
    def skip_reason(cls, data: Any) -> str:
        c = data.meta["channels"]
        if c != 3:
            return (f"cmc: skipped, the dataset is grayscale ({c} channel{'s' if c > 1 else ''}): it has the L "
                    "view only, no ab view to contrast it with (the backbone stays at its init; a colour "
                    "dataset such as cifar10 runs it)")
        return ""

    @classmethod
    def from_data(cls, backbone: Any, cfg: CMCCfg, data: Data) -> "CMC":
        return cls(backbone, cfg, data.num_classes, n_train=data.meta["n_train"])

    @classmethod
    def validate(cls, cfg: CMCCfg, data: Data, feat_dim: int) -> None:
        n = data.meta["n_train"]
        if data.meta["channels"] == 3 and cfg.nce_k >= n:
            raise ConfigError(f"cmc.nce_k: {cfg.nce_k} negatives need more than {cfg.nce_k} training images, "
                              f"got {n} (use nce_k < {n})")

    def eval_head(self) -> EvalHead | None:
        return None  # the paper's protocols read the concatenated encoder features

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_l, f_ab): the unit embeddings of the two views, (B, dim) each."""
        feats = self.backbone(x).split(self.dims, dim=1)  # (B, d_l), (B, d_ab)
        f_l, f_ab = (l2n(h(v)).float() for h, v in zip(self.heads, feats))
        return f_l, f_ab

    def forward(self, batch: Batch) -> StepOut:
        c = self.cfg
        idx = batch.idx
        f_l, f_ab = self.embed(batch.x)
        # one uniform draw for both views (official AliasMethod over uniform unigrams), from the global RNG
        # the loop seeds per (run seed, epoch, batch): a run resumed at any step draws the same
        noise = torch.randint(0, self.n, (len(idx), c.nce_k), device=idx.device)  # (B, K)
        ids = torch.cat([idx[:, None], noise], dim=1)  # (B, 1 + K), column 0 the positive
        bank_l, bank_ab = self.banks[0].memory, self.banks[1].memory  # (N, D) each, before this step's update
        out_l = cmc_scores(f_l, bank_ab, ids, c.temperature)  # L against the ab bank: (B, 1 + K)
        out_ab = cmc_scores(f_ab, bank_l, ids, c.temperature)  # ab against the L bank
        logs: dict[str, torch.Tensor] = {}
        if c.loss == "softmax":
            target = torch.zeros(len(idx), dtype=torch.long, device=idx.device)
            l_loss, ab_loss = F.cross_entropy(out_l, target), F.cross_entropy(out_ab, target)
        else:
            if not self._z_known:  # official: each Z from the first batch, then constant
                if float(self.z.min()) <= 0.0:  # several processes: the mean of the ranks' estimates
                    z = torch.tensor([estimate_z(out_l, self.n), estimate_z(out_ab, self.n)], dtype=torch.float64,
                                     device=out_l.device)
                    self.z.copy_(dist.all_reduce(z, "mean"))
                self._z_known = True
            l_loss = nce_loss(out_l, self.z[0].log().float(), self.n)
            ab_loss = nce_loss(out_ab, self.z[1].log().float(), self.n)
        logs.update(l_loss=l_loss.detach(), ab_loss=ab_loss.detach(),
                    l_pos_sim=(out_l[:, 0].detach() * c.temperature).mean())
        self._pending = (idx, f_l.detach(), f_ab.detach())
        return StepOut(l_loss + ab_loss, logs)

    def on_after_step(self, stepped: bool) -> None:
        # each bank's entries of the batch become normalise(m v + (1 - m) f) of its own view; several
        # processes: the pairs of all ranks, so every rank's banks stay the same
        if self._pending is not None:
            idx, f_l, f_ab = self._pending
            every = dist.all_gather(idx)
            self.banks[0].update(every, dist.all_gather(f_l), self.cfg.memory_momentum)
            self.banks[1].update(every, dist.all_gather(f_ab), self.cfg.memory_momentum)
        self._pending = None

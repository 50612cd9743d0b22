"""InstDisc: unsupervised feature learning via non-parametric instance discrimination
(Wu, Xiong, Yu, Lin; CVPR 2018), as the paper and the official code
(zhirongw/lemniscate.pytorch) do it.

- Every image is its own class. The backbone features go through a linear layer to a
  ``dim``-d embedding (official: the network's last fc to ``low_dim`` 128), L2-normalised
  (sec. 3.1).
- ``softmax: nonparametric`` (the method): a memory bank holds one embedding per
  training image (``selfsup.models.memory_bank.MemoryBank``). The loss compares the embedding f of
  image i with the bank, P(i|f) = exp(v_i^T f / tau) / Z (sec. 3.1), through
  - NCE (``nce_m`` > 0, sec. 3.2): ``nce_m`` noise entries drawn uniformly per sample;
    Z = N * mean(exp(v^T f / tau)) estimated once, on the first batch, then fixed
    (official code; the paper's Eq. 7 "approximated from initial batches"); or
  - the exact softmax over all N entries (``nce_m: 0``; official ``LinearAverage``).
  After the step's loss, the bank entries of the batch become
  normalise(m * v_i + (1 - m) * f_i) (official momentum 0.5; the paper copies f_i in,
  ``memory_momentum: 0``).
- ``prox_lambda`` > 0 adds the proximal term of sec. 3.4, lambda * ||f_i - v_i||^2 with v_i
  the bank entry (the previous iteration's embedding of i). The official code has no such
  term (its momentum update plays that role), hence default 0.
- ``softmax: parametric``: the baseline of the paper's Table 1, Eq. 1: a standard softmax
  classifier with one class (weight vector w_i, no bias) per instance on the same
  normalised embedding, P(i|f) = exp(w_i^T f) / sum_j exp(w_j^T f); no memory bank.

Defaults are the official CIFAR script's (cifar.py): lr 0.03, momentum 0.9, weight decay
5e-4, batch 128, 200 epochs with lr x0.1 at epochs 120 and 160, nce_k 4096, nce_t 0.1,
nce_m 0.5, RandomResizedCrop(scale 0.2-1) + ColorJitter(0.4, 0.4, 0.4, 0.4) (always) +
RandomGrayscale(0.2), no flip. ImageNet (main.py): temperature 0.07, batch 256, weight
decay 1e-4, flip on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.core import dist
from selfsup.core.config import ConfigError, non_negative, one_of, positive
from selfsup.engine.config import TrainCfg
from selfsup.data.prepared import Data
from selfsup.models.heads import EvalHead, l2n, projection_head, proj_spec
from selfsup.losses.nce import estimate_z, full_softmax_loss, nce_loss
from selfsup.models.memory_bank import MEMORY_INITS, MemoryBank
from selfsup.methods import register
from selfsup.engine.contract import Batch, Method, StepOut

INSTDISC_SOFTMAX = ("nonparametric", "parametric")  # InstDisc's softmax (Table 1 rows too: instdisc_table1)


@dataclass
class InstDiscCfg(TrainCfg):
    # official CIFAR optimisation (cifar.py)
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.03
    weight_decay: float = 5e-4
    lr_schedule: str = "step"
    schedule_unit: str = "epoch"  # official adjust_learning_rate: once per epoch
    lr_steps: list[int] = field(default_factory=lambda: [120, 160])
    augment: str = "crop"  # official CIFAR: no flip (commented out); ImageNet: crop_flip
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.4])
    jitter_p: float = 1.0  # official: ColorJitter applied to every image
    grayscale_p: float = 0.2
    # the method
    dim: int = 128  # embedding size (official low_dim)
    softmax: str = "nonparametric"  # nonparametric (the method) | parametric (Table 1 baseline)
    nce_m: int = 4096  # noise samples per image; 0: the exact non-parametric softmax
    temperature: float = 0.1  # official CIFAR nce_t 0.1; paper / ImageNet 0.07
    memory_momentum: float = 0.5  # official nce_m 0.5; the paper's plain copy is 0
    memory_init: str = "uniform"  # uniform (official code) | unit (the paper's random unit vectors)
    prox_lambda: float = 0.0  # sec. 3.4 proximal term; 0 in the official code

    def check(self, p: str) -> None:
        super().check(p)
        positive(p, self, "dim", "temperature")
        non_negative(p, self, "nce_m", "prox_lambda")
        one_of(p, "softmax", self.softmax, INSTDISC_SOFTMAX)
        one_of(p, "memory_init", self.memory_init, MEMORY_INITS)
        if not 0.0 <= self.memory_momentum < 1.0:
            raise ConfigError(f"{p}.memory_momentum: must be in [0, 1), got {self.memory_momentum}")
        if self.softmax == "parametric" and (self.nce_m or self.prox_lambda):
            raise ConfigError(f"{p}.nce_m: the parametric softmax is exact and has no memory bank; "
                              f"set nce_m: 0 and prox_lambda: 0 (got {self.nce_m}, {self.prox_lambda})")


@register
class InstDisc(Method):
    name = "instdisc"
    Config = InstDiscCfg

    def __init__(self, backbone: Any, cfg: InstDiscCfg, num_classes: int, n_train: int = 0):
        super().__init__(backbone, cfg, num_classes)
        self.head = projection_head("linear", backbone.out_dim, cfg.dim)
        self.n = n_train
        self.bank: MemoryBank | None = None
        self.classifier: nn.Linear | None = None
        if cfg.softmax == "parametric":
            self.classifier = nn.Linear(cfg.dim, n_train, bias=False)  # one class per instance (Eq. 1)
        else:
            # seeded from the global RNG, which build_method seeds from the run seed
            self.bank = MemoryBank(n_train, cfg.dim, int(torch.randint(2**31 - 1, ())), cfg.memory_init)
        # the NCE normalising constant, estimated on the first batch then fixed (0: not yet);
        # a buffer so that the checkpoint carries it and a resumed run keeps the same Z
        self.register_buffer("z", torch.zeros((), dtype=torch.float64))
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (idx, f) for the bank update
        self._z_known = False  # z read once per process (a resumed run has it in the buffer)

    @classmethod
    def from_data(cls, backbone: Any, cfg: InstDiscCfg, data: Data) -> "InstDisc":
        return cls(backbone, cfg, data.num_classes, n_train=data.meta["n_train"])

    @classmethod
    def validate(cls, cfg: InstDiscCfg, data: Data, feat_dim: int) -> None:
        n = data.meta["n_train"]
        if cfg.nce_m >= n:
            raise ConfigError(f"instdisc.nce_m: {cfg.nce_m} noise samples need more than {cfg.nce_m} training "
                              f"images, got {n} (use nce_m < {n}, or 0 for the exact softmax)")

    def eval_head(self) -> EvalHead:
        # lemniscate's kNN (test.py) compares the L2-normalised 128-d outputs (the memory bank's space)
        return EvalHead({"proj": proj_spec("linear", self.backbone.out_dim, self.cfg.dim), "l2": True}, self.head)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return l2n(self.head(self.backbone(x)))  # (B, dim), unit rows

    def forward(self, batch: Batch) -> StepOut:
        c = self.cfg
        idx = batch.idx
        f = self.embed(batch.x).float()  # (B, D)
        if self.classifier is not None:  # parametric softmax, Eq. 1
            return StepOut(F.cross_entropy(self.classifier(f), idx))
        assert self.bank is not None
        mem = self.bank.memory  # (N, D); the table before this step's update
        logs: dict[str, torch.Tensor] = {}
        if c.nce_m == 0:
            loss = full_softmax_loss(f, mem, idx, c.temperature)
        else:
            # noise from the global RNG, which the loop seeds per (run seed, epoch, batch): a run
            # resumed at any step draws the same
            noise = torch.randint(0, self.bank.n, (len(idx), c.nce_m), device=idx.device)  # (B, m)
            ids = torch.cat([idx[:, None], noise], dim=1)  # (B, 1 + m), column 0 the positive
            logits = torch.einsum("bkd,bd->bk", mem[ids], f) / c.temperature  # (B, 1 + m)
            if not self._z_known:  # official: Z from the first batch, then constant (one host sync per run)
                if float(self.z) <= 0.0:  # several processes: the mean of the ranks' estimates, one Z for all
                    z = torch.tensor([estimate_z(logits, self.bank.n)], dtype=torch.float64, device=logits.device)
                    self.z.fill_(float(dist.all_reduce(z, "mean")))
                self._z_known = True
            loss = nce_loss(logits, self.z.log().float(), self.bank.n)
            logs["z"] = self.z.float()
        if c.prox_lambda:  # sec. 3.4: lambda * ||f_i(t) - v_i(t-1)||^2, v_i from the bank
            prox = ((f - mem[idx]) ** 2).sum(1).mean()
            logs["prox"] = prox.detach()
            loss = loss + c.prox_lambda * prox
        self._pending = (idx, f.detach())
        return StepOut(loss, logs)

    def on_after_step(self, stepped: bool) -> None:
        # the bank entries of the batch become normalise(m v + (1 - m) f) after the step's loss;
        # several processes: the (index, embedding) pairs of all ranks, so every bank stays the same
        if self._pending is not None and self.bank is not None:
            idx, f = self._pending
            self.bank.update(dist.all_gather(idx), dist.all_gather(f), self.cfg.memory_momentum)
        self._pending = None

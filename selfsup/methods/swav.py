"""SwAV (Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
NeurIPS 2020): the codes (soft cluster assignments to K trainable prototypes) of one view are predicted
from another view of the same image, the "swapped" prediction; the codes are computed online, per
batch, under an equal-partition constraint (sec. 3.1). Official code: facebookresearch/swav,
``main_swav.py`` (read for this file; nothing copied).

- Network (sec. 3.1, official ``src/resnet50.py``): backbone -> projection head Linear(hidden) -> BN
  -> ReLU -> Linear(``feat_dim``) (``selfsup.models.heads.projection_head``; the official first Linear has a
  bias before the BN, ours drops it, BN removes it anyway) -> L2 normalisation -> prototypes, a
  bias-free Linear(``feat_dim``, K): scores z^T c_k.
- Prototypes (sec. 3.1; appendix A.1 pseudocode): each prototype is L2-normalised. The paper
  normalises after each update; the official loop at the start of each iteration (under no_grad).
  Here: once at construction and after every optimiser step (``on_after_step``), so every forward
  sees unit prototypes (the same sequence of weights). Frozen for the first
  ``freeze_prototypes_iters`` optimiser steps (official ``freeze_prototypes_niters`` 313, one ImageNet
  epoch at batch 4096; the appendix, as we recall it: during the first epoch), see
  ``selfsup.models.prototypes.PrototypeFreeze`` for how the official ``p.grad = None`` is reproduced.
- Codes (sec. 3.1, eq. 3; ``swav_sinkhorn``): Q = Diag(u) exp(C^T Z / eps) Diag(v) by ``sinkhorn_iters``
  = 3 Sinkhorn-Knopp iterations, eps = 0.05, soft (no rounding: sec. 3.1 finds the continuous codes
  better), computed only for the crops ``crops_for_assign`` (the two large crops), without gradient.
  With several processes the problem is the global batch: the sums over samples are all-reduced
  (official ``distributed_sinkhorn``).
- Loss (eq. 1 and, with multi-crop, eq. 4; ``swav_loss``): for each assigned crop i, the
  cross-entropy -sum_k q_i^k log softmax(z_v^T C / tau)^k against every other crop v != i
  (tau = ``temperature`` 0.1). The paper writes sums over i and v; the official code averages over
  the batch, the V - 1 other crops and the assigned crops: we follow the code (a constant factor).
- Multi-crop (sec. 3.2; ``selfsup.models.prototypes``): ``n_large`` = 2 crops of the dataset's size and
  ``n_small`` crops of ``small_size``; views of one resolution share a backbone pass (official).
- Queue (sec. 3.1, "working with small batches"; official ``queue_length``, ``epoch_queue_starts``): from
  epoch ``epoch_queue_starts`` on, the embeddings of the assigned crops of each batch are pushed into a
  first-in-first-out queue (newest first, as the official code), and once it is full the scores of the
  stored embeddings against the current prototypes are put before the batch's scores in Sinkhorn;
  only the batch's rows of the codes are used. The official code keeps one queue of
  ``queue_length / W`` per process, filled with that process's embeddings; here the queue is a
  buffer of ``queue_length`` filled with the embeddings of all ranks (``dist.all_gather``), identical
  on every rank and checkpointed with the model, and each rank contributes its share of the queue rows
  (``dist.shard``) to the distributed Sinkhorn: the same global problem (the whole queue + the global
  batch), and with one process the same as W processes on the concatenated batch.
  The length is rounded down to a multiple of the global batch B x W, as the official ``main_swav.py``
  does before building its queues (``args.queue_length -= args.queue_length % (args.batch_size *
  args.world_size)``): the queue then holds whole batches, and its rows share out evenly over the
  ranks. A positive length below one global batch, which the official rounding silently turns into no
  queue, is refused (``effective_queue_length``).
- Official ImageNet (``scripts/swav_800ep_pretrain.sh``): ResNet-50, 2 x 224 + 6 x 96 crops (scales
  0.14-1 / 0.05-0.14), batch 4096 (64 GPUs x 64), LARC (trust 0.001, no clipping) over SGD momentum
  0.9, base lr 4.8, final lr 0.0048 (cosine), 10 warm-up epochs from 0.3, weight decay 1e-6, K 3000,
  feat_dim 128, hidden 2048, no queue, 800 epochs; batch 256 (``swav_200ep_bs256``): lr 0.6, queue 3840
  from epoch 15, prototypes frozen 5005 iterations. The LARC trust ratio is ``lars_rule: larc`` (the
  typed default here), the warm-up's start ``warmup_start_lr`` (0.3 in the 800-epoch script; the
  ``main_swav.py`` default 0), the blur PIL's (``blur_kernel: pil``, the typed default).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selfsup.core import dist
from selfsup.augment.batched import ViewSpec
from selfsup.core.config import ConfigError, non_negative, one_of, positive
from selfsup.cluster.sinkhorn import swav_sinkhorn
from selfsup.losses.prototypes import swav_loss
from selfsup.models.heads import projection_head
from selfsup.methods import register
from selfsup.engine.contract import Batch, EpochPlan, Method, StepOut, TrainContext
from selfsup.models.prototypes import PrototypeFreeze, embed_crops, multicrop_specs, normalise_rows_, state_int
from selfsup.engine.config import MultiCropCfg


@dataclass
class SwAVCfg(MultiCropCfg):
    prototypes: int = 3000  # official nmb_prototypes
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    queue_length: int = 0  # official: 0 at batch 4096, 3840 at batch 256
    epoch_queue_starts: int = 15
    # LARS trust ratio (optimizer lars): larc, apex LARC with clip=False as main_swav.py wraps its SGD
    # (facebookresearch/swav@06b1b7c main_swav.py; NVIDIA/apex apex/parallel/LARC.py)
    lars_rule: str = "larc"
    # the blur of every crop: pil, PIL's ImageFilter.GaussianBlur(radius = sigma ~ U(0.1, 2)) without a
    # kernel cut at 10 % of the crop (swav src/multicropdataset.py PILRandomGaussianBlur; solo-learn's
    # GaussianBlur) | simclr, torchvision's kernel of 10 % of the crop's side (selfsup/augment/batched.py)
    blur_kernel: str = "pil"

    def check(self, p: str) -> None:
        super().check(p)
        one_of(p, "blur_kernel", self.blur_kernel, ("pil", "simclr"))
        positive(p, self, "prototypes", "epsilon", "sinkhorn_iters")
        non_negative(p, self, "queue_length", "epoch_queue_starts")
        if self.n_crops < 2:
            raise ConfigError(f"{p}.n_small: the swapped prediction needs at least 2 crops, got n_large "
                              f"{self.n_large} + n_small {self.n_small}")


def effective_queue_length(length: int, batch: int, world: int, key: str = "swav.queue_length") -> int:
    """``length`` rounded down to a multiple of the global batch ``batch`` x ``world`` (official
    ``main_swav.py``: ``args.queue_length -= args.queue_length % (args.batch_size * args.world_size)``).
    A positive length that rounds to 0 raises: the official run would quietly train without the queue
    the config asks for."""
    if length < 0 or batch < 1 or world < 1:
        raise ValueError(f"effective_queue_length: length >= 0, batch and world >= 1, got {length}, {batch}, {world}")
    out = length - length % (batch * world)
    if length > 0 and out == 0:
        raise ConfigError(f"{key}: {length} is below one global batch ({batch} per process x {world} processes "
                          f"= {batch * world}); the official rounding to a multiple of it would leave no queue. "
                          f"Set 0 (no queue) or at least {batch * world}")
    return out


# --------------------------------------------------------------------------- the method
@register
class SwAV(Method):
    name = "swav"
    Config = SwAVCfg

    def __init__(self, backbone: Any, cfg: SwAVCfg, num_classes: int):
        super().__init__(backbone, cfg, num_classes)
        self.projector = projection_head("mlp", backbone.out_dim, cfg.feat_dim, cfg.proj_hidden, bn=True)
        self.prototypes = nn.Linear(cfg.feat_dim, cfg.prototypes, bias=False)  # weight (K, feat_dim)
        normalise_rows_(self.prototypes)
        a = len(cfg.crops_for_assign)
        # the queue's length as the official code uses it (a multiple of the global batch); the config
        # keeps the value asked for
        self.queue_length = effective_queue_length(cfg.queue_length, cfg.batch_size, dist.world())
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # optimiser steps so far
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))  # the epoch being trained
        self.register_buffer("queue", torch.zeros(a, self.queue_length, cfg.feat_dim))  # (A, L, D), newest first
        self.register_buffer("queue_rows", torch.zeros((), dtype=torch.long))  # rows filled so far (<= L)
        self.freeze = PrototypeFreeze([self.prototypes], cfg.freeze_prototypes_iters)
        self._pending: torch.Tensor | None = None  # (A, B, D) this batch's embeddings for the queue
        self._sync_host()

    def _sync_host(self) -> None:
        """Host copies of the counters (no device sync per step)."""
        self._steps, self._epoch, self._rows = (state_int(self, n) for n in ("steps_done", "epoch", "queue_rows"))

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().load_checkpoint_state(state)
        self._sync_host()

    def view_specs(self) -> list[ViewSpec]:
        """The multi-crop views, each blurred by the ``blur_kernel`` rule."""
        return [dataclasses.replace(s, blur_rule=self.cfg.blur_kernel) for s in multicrop_specs(self.cfg)]

    def on_epoch_start(self, epoch: int, ctx: TrainContext) -> EpochPlan:
        self._epoch = epoch
        self.epoch.fill_(epoch)
        self.freeze.reset = ctx.reset_optimizer_state
        return EpochPlan()

    def on_resume(self, ctx: TrainContext) -> None:
        self.freeze.reset = ctx.reset_optimizer_state

    def queue_in_use(self) -> bool:
        """The official rule: the queue joins Sinkhorn once it is full."""
        return self.queue_length > 0 and self._rows >= self.queue_length

    def codes(self, scores: torch.Tensor, b: int) -> torch.Tensor:
        """scores (V B, K) crop-major -> (A, B, K) codes of the assigned crops (queue rows first)."""
        c = self.cfg
        out = []
        with torch.no_grad():
            w = self.prototypes.weight.detach().float()  # (K, D)
            use_queue = self.queue_in_use()
            mine = dist.shard(self.queue_length)  # this rank's share of the queue rows in the global problem
            for i, crop in enumerate(c.crops_for_assign):
                s = scores[crop * b:(crop + 1) * b].detach().float()  # (B, K)
                if use_queue:
                    s = torch.cat([self.queue[i, mine] @ w.t(), s])  # (L_r + B, K)
                out.append(swav_sinkhorn(s, c.epsilon, c.sinkhorn_iters)[-b:])  # (B, K): the batch's rows
        return torch.stack(out)  # (A, B, K)

    def forward(self, batch: Batch) -> StepOut:
        c = self.cfg
        views = batch.views  # n_large x (B, C, S, S), then n_small x (B, C, s, s)
        b, v = views[0].shape[0], len(views)
        self.freeze.before_step(self._steps)
        z = embed_crops(self.backbone, self.projector, views)  # (V B, D), unit rows
        scores = self.prototypes(z).float()  # (V B, K)
        codes = self.codes(scores, b)  # (A, B, K)
        loss = swav_loss(scores.view(v, b, -1), codes, c.crops_for_assign, c.temperature)
        if self.training and self.queue_length > 0 and self._epoch >= c.epoch_queue_starts:
            self._pending = torch.stack([z[k * b:(k + 1) * b].detach() for k in c.crops_for_assign])  # (A, B, D)
        return StepOut(loss, {"queue_used": torch.tensor(float(self.queue_in_use()), device=loss.device)})

    @torch.no_grad()
    def push_queue(self, new: torch.Tensor) -> None:
        """new (A, n, D): the newest embeddings (all ranks', rank order) go to the front."""
        length = self.queue_length
        n = min(new.shape[1], length)
        self.queue[:, n:] = self.queue[:, :length - n].clone()
        self.queue[:, :n] = new[:, :n]
        self._rows = min(length, self._rows + n)
        self.queue_rows.fill_(self._rows)

    @torch.no_grad()
    def on_after_step(self, stepped: bool) -> None:
        if self._pending is not None:  # every batch's embeddings, accumulation or not (official)
            gathered = dist.all_gather(self._pending.transpose(0, 1).contiguous())  # (W B, A, D)
            self.push_queue(gathered.transpose(0, 1))
            self._pending = None
        if not stepped:
            return
        if not self.freeze.after_step(self._steps):  # frozen: put back as they were (already unit)
            normalise_rows_(self.prototypes)
        self._steps += 1
        self.steps_done.fill_(self._steps)

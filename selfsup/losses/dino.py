"""DINO's self-distillation loss and its centring (Caron et al., ICCV 2021, sec. 3.1, Algorithm 1;
official ``main_dino.py``, ``DINOLoss``): the teacher's centred, sharpened softmax as the target of
the student's softmax, over every pair of different crops."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.core import dist

# --------------------------------------------------------------------------- pure functions
def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """The teacher temperature of (0-based) ``epoch``: ``warmup_epochs`` values from ``warmup_temp`` to
    ``temp`` evenly spaced, both ends included (``np.linspace``), then ``temp`` (the official
    ``teacher_temp_schedule``)."""
    if epoch >= warmup_epochs:
        return temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (temp - warmup_temp) * epoch / (warmup_epochs - 1)


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, centre: torch.Tensor, student_temp: float,
              teacher_temp: float, n_global: int = 2) -> torch.Tensor:
    """DINO's loss. ``student``: (V B, K) outputs of the V views, view by view (the ``n_global`` global
    ones first); ``teacher``: (n_global B, K) outputs of the global views; ``centre``: (1, K) or (K,).
    The mean over the pairs (teacher view i, student view v != i) of the batch-averaged cross-entropy
    between softmax((teacher_i - centre) / teacher_temp) (no gradient) and softmax(student_v / student_temp)."""
    b = len(teacher) // n_global
    v = len(student) // b
    t = F.softmax((teacher.detach().float() - centre.float()) / teacher_temp, dim=-1).chunk(n_global)
    logp = F.log_softmax(student.float() / student_temp, dim=-1).chunk(v)
    total, terms = student.new_zeros((), dtype=torch.float32), 0
    for i, q in enumerate(t):
        for j, lp in enumerate(logp):
            if i != j:  # not the view the teacher saw
                total = total - (q * lp).sum(-1).mean()
                terms += 1
    return total / terms


@torch.no_grad()
def batch_centre(teacher: torch.Tensor) -> torch.Tensor:
    """(1, K): the mean of the teacher outputs over the global batch (all ranks: a summed all-reduce)."""
    s = teacher.detach().float().sum(0, keepdim=True)
    dist.all_reduce(s)
    return s / (len(teacher) * dist.world())


@torch.no_grad()
def update_centre(centre: torch.Tensor, batch_mean: torch.Tensor, m: float) -> torch.Tensor:
    """C <- m C + (1 - m) batch_mean (a new tensor)."""
    return centre * m + batch_mean * (1.0 - m)

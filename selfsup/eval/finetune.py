"""End-to-end fine-tuning evaluation: the pretrained backbone plus a linear classifier, all of it trained on
the labelled training split, test top-1 at the end (BEiT sec. 3.1 / MAE sec. 4: the protocol masked image
modelling is judged by, where a linear probe under-rates it; run here for every method).

The recipe is the MAE / BEiT fine-tuning code's (``main_finetune.py``, ``util/lr_decay.py``), each part a
param of ``finetune:`` so the papers' settings are a preset away:

- AdamW (or SGD) with a per-step linear warm-up then half-cosine to ``min_lr`` (MAE's and BEiT's
  ``--min_lr 1e-6``), lr = ``lr`` x global batch / 256 (MAE's ``blr``; ``lr_scaling``);
- layer-wise learning-rate decay for Vision Transformers (BEiT sec. 2.6, "layer-wise learning rate
  decay"): layer i of L gets lr x ``layer_decay`` ^ (L + 1 - i), the patch / CLS / position embeddings
  are layer 0 and the classifier and final norm layer L + 1 (MAE's ``param_groups_lrd``); conv nets
  are fine-tuned at one lr (the papers tune ResNets that way), so the key only acts on ViTs;
- no weight decay on biases, norms, the CLS token and the position embedding (MAE's ``no_weight_decay``,
  BEiT's ``{pos_embed, cls_token}`` with 1-d parameters and biases); BEiT's relative position bias tables
  are decayed, as there by default;
- BEiT's shared relative position bias (a trunk saved with ``ViT.options`` rel_pos_bias "shared") is
  copied into every block before training (``ViT.unshare_rel_pos_bias``), as unilm@768a3c8
  ``run_class_finetuning.py`` does with ``--rel_pos_bias`` (its default); each copy takes its block's
  layer decay;
- stochastic depth for ViTs (``drop_path``: MAE's and BEiT's 0.1, rising linearly over the blocks);
- label smoothing, mixup and CutMix (Zhang et al. 2018; Yun et al. 2019) on soft targets, one of the
  two per batch with probability ``mix_switch_p`` when both are on (timm's ``Mixup``, which the MAE
  code uses; its per-element modes are not reproduced: said in the README);
- timm's training transform after the crop and flip (MAE / BEiT ``build_transform``): RandAugment
  (``randaugment``, ``RandAug``: torchvision's ops, where they differ from timm's said there), then
  normalisation, then random erasing (``reprob``, per-pixel N(0, 1) noise: timm's mode 'pixel');
- mixed precision (``precision``: autocast of the training forward, fp16 with a ``GradScaler``);
- ``batch_size`` is the global batch of one optimiser step (the official 1024 = GPUs x per-GPU batch); the
  loader's batch of that size goes through the network in ``micro_batch`` images at a time with the
  gradients accumulated (MAE's ``accum_iter`` arithmetic), one optimiser and schedule step per batch. For a
  ViT this changes nothing but memory, except mixup / CutMix, drawn per micro-batch as the official code
  draws them per GPU batch; RandAugment and random erasing are per image either way;
- the classifier's input (``pool``): the CLS token, or for a ViT the mean patch token through a new
  LayerNorm ``fc_norm`` (MAE's ``global_pool``, BEiT's ``use_mean_pooling``);
- the classifier: ``Linear(D, classes)``, weight N(0, ``head_init_std``) (0.01; MAE 2e-5: main_finetune.py
  ``trunc_normal_(model.head.weight, std=2e-5)`` on the plain head, no BN before it (the BN-headed
  variant is MAE's linear probe, ``main_linprobe.py``); BEiT 0.02), bias 0, both x ``head_init_scale``
  (BEiT's ``init_scale`` 0.001).

Fine-tuning runs in one process (rank 0 of the ``evaluate`` stage), so the global batch has no
process factor. Test: the centre-crop eval transform of the other evaluations, the whole network in
eval mode, fp32.
"""
from __future__ import annotations

import math
import re
from contextlib import nullcontext
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from selfsup.augment.batched import ViewSpec
from selfsup.core.io import derive_seed
from selfsup.eval.knn import topk_accuracy

_BLOCK = re.compile(r"\.encoder\.layers\.encoder_layer_(\d+)\.")
_EMBED = (".conv_proj.", ".class_token", ".pos_embedding")


def vit_layer_id(name: str, depth: int) -> int:
    """Layer id of a parameter of a ``Backbone`` with a ``selfsup.models.backbones.ViT`` trunk (``fc.*`` is the
    classifier): embeddings 0, block i (0-based) i + 1, the final norm and the classifier depth + 1."""
    if any(k in name for k in _EMBED):
        return 0
    m = _BLOCK.search(name)
    return int(m.group(1)) + 1 if m else depth + 1


def param_groups_lrd(model: nn.Module, weight_decay: float, layer_decay: float, depth: int | None
                     ) -> list[dict[str, Any]]:
    """Parameter groups of ``model`` (``backbone`` + ``fc``): (layer, decayed or not) -> {params,
    weight_decay, lr_scale}; ``depth`` None (a conv net): every lr_scale is 1."""
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name.endswith((".class_token", ".pos_embedding"))
        layer = 0 if depth is None else vit_layer_id(name, depth)
        scale = 1.0 if depth is None else layer_decay ** (depth + 1 - layer)
        g = groups.setdefault((layer, no_wd), {"params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                                               "lr_scale": scale, "lars_exclude": no_wd})
        g["params"].append(p)
    return list(groups.values())


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: Any, g: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed x (B, C, H, W), soft targets (B, classes)): label smoothing, then mixup or CutMix with the
    batch reversed (timm's ``Mixup`` pairing), lambda ~ Beta(alpha, alpha); CutMix's lambda is corrected
    to the box's true area."""
    off = c.label_smoothing / num_classes
    t = torch.full((len(y), num_classes), off, device=x.device)
    t.scatter_(1, y[:, None], 1.0 - c.label_smoothing + off)  # (B, classes)
    use_mix, use_cut = c.mixup > 0, c.cutmix > 0
    if not (use_mix or use_cut):
        return x, t
    if use_mix and use_cut:
        use_cut = bool(torch.rand((), generator=g) < c.mix_switch_p)
        use_mix = not use_cut
    alpha = c.cutmix if use_cut else c.mixup
    lam = float(np.random.default_rng(int(torch.randint(2**31, (), generator=g))).beta(alpha, alpha))
    if use_cut:  # a box of area (1 - lam) of the image from the paired sample
        h, w = x.shape[-2:]
        rh, rw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(h, (), generator=g)), int(torch.randint(w, (), generator=g))
        y0, y1 = max(cy - rh // 2, 0), min(cy + rh // 2, h)
        x0, x1 = max(cx - rw // 2, 0), min(cx + rw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = lam * x + (1.0 - lam) * x.flip(0)
    return x, lam * t + (1.0 - lam) * t.flip(0)


class RandAug:
    """timm's ``rand-m<m>-n<n>-mstd<s>-inc1`` (MAE / BEiT ``build_transform``: ``rand-m9-mstd0.5-inc1``)
    from torchvision's ``transforms.v2.RandAugment``, one image at a time (each image its own draws).

    As timm (``timm/data/auto_augment.py``): ``n`` ops per image drawn with replacement, each applied
    with probability 0.5, each with its own magnitude ~ N(m, s) clipped to [0, 10] (of timm's 10 levels:
    torchvision's 101 magnitude bins, a level resolution of 0.1), geometric ops filled with the mean
    colour (timm's ``img_mean``), on uint8 pixels. Where it differs from timm's inc1 set: torchvision
    draws from Identity, ShearX/Y, TranslateX/Y, Rotate, Brightness, Color, Contrast, Sharpness,
    Posterize, Solarize, AutoContrast, Equalize, so it has Identity and lacks timm's Invert and
    SolarizeAdd; its Posterize keeps 8 down to 4 bits over the levels (timm's PosterizeIncreasing 4
    down to 0); translation reaches 150/331 of the side (timm 0.45); resampling is bilinear (MAE's and
    BEiT's transform ask timm for bicubic, which torchvision's tensor affine lacks). Shear, rotation,
    the enhance ops and Solarize match timm's increasing versions level for level, up to rounding."""

    BINS = 101  # magnitude index i = level x 10: torchvision's linspace(0, max, 101)[i] = max x level / 10

    def __init__(self, n: int, m: float, mstd: float, mean: Sequence[float]):
        self.n, self.m, self.mstd = n, m, mstd
        self.fill = [int(round(255 * v)) for v in mean]
        self._ops: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}

    def op(self, level: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """One op at ``level`` (0-10), applied with probability 0.5 (timm's ``AugmentOp`` prob)."""
        from torchvision.transforms import v2

        i = int(round(level * (self.BINS - 1) / 10))
        if i not in self._ops:
            ra = v2.RandAugment(num_ops=1, magnitude=i, num_magnitude_bins=self.BINS,
                                interpolation=v2.InterpolationMode.BILINEAR, fill=self.fill)
            self._ops[i] = v2.RandomApply([ra], p=0.5)
        return self._ops[i]

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """uint8 (B, C, H, W) -> uint8 (B, C, H, W); magnitudes from ``g``, the ops' own draws from the
        global RNG (torchvision's; the caller forks and seeds it)."""
        out = torch.empty_like(x)
        for b in range(len(x)):
            img = x[b]  # (C, H, W)
            for _ in range(self.n):
                level = min(max(self.m + self.mstd * float(torch.randn((), generator=g)), 0.0), 10.0)
                img = self.op(level)(img)
            out[b] = img
        return out


def random_erasing(x: torch.Tensor, p: float) -> torch.Tensor:
    """timm's ``RandomErasing(p, mode='pixel')`` on normalised images (B, C, H, W), one image at a time:
    with probability p a box of 2-33 % of the area, log-uniform aspect in [0.3, 1 / 0.3], filled with
    N(0, 1) noise per pixel and channel (torchvision's ``value='random'``: the same draw rule)."""
    from torchvision.transforms import v2

    erase = v2.RandomErasing(p=p, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value="random")
    return torch.stack([erase(img) for img in x])


def timm_train_transform(x: torch.Tensor, c: Any, mean: Sequence[float], std: Sequence[float],
                         aug: RandAug | None, seed: int) -> torch.Tensor:
    """The part of timm's training transform after the crop and flip, on a normalised batch (B, C, H, W)
    from the loader: back to uint8, RandAugment, normalisation, random erasing (timm's order). Seeded
    by ``seed`` without touching the global RNG (dropout and drop path keep their stream)."""
    if aug is None and not c.reprob:
        return x
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if aug is not None:  # timm runs it on the PIL crop: uint8 pixels
            u8 = ((x * s + m).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)  # (B, C, H, W)
            x = (aug(u8, torch.Generator().manual_seed(seed)).to(x.dtype) / 255.0 - m) / s
        if c.reprob:
            x = random_erasing(x, c.reprob)
    return x


class MeanPool(nn.Module):
    """A ViT backbone whose output is the mean of the last block's patch tokens through a new LayerNorm
    (eps 1e-6): MAE's ``global_pool`` (models_vit.py ``forward_features``: the final norm deleted,
    ``fc_norm`` after the mean) and BEiT's ``use_mean_pooling`` (``norm`` an identity, ``fc_norm``).
    The backbone's own final LayerNorm is left unused (it gets no gradient)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        from selfsup.models.backbones import vit_trunk

        if vit_trunk(backbone) is None:
            raise ValueError("finetune.pool: mean pools a ViT's patch tokens; a conv net has none")
        self.backbone = backbone
        self.fc_norm = nn.LayerNorm(backbone.out_dim, eps=1e-6)
        self.out_dim = backbone.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, D)
        from selfsup.models.backbones import vit_trunk

        for m in self.backbone.front():
            x = m(x)
        t = vit_trunk(self.backbone).block_tokens(x)[-1]  # (B, 1 + h w, D), before the final norm
        return self.fc_norm(t[:, 1:].mean(1))


def init_head(fc: nn.Linear, std: float, scale: float, g: torch.Generator) -> None:
    """weight ~ N(0, std), bias 0 (std 0: ``nn.Linear``'s own init kept), then both x ``scale`` (BEiT's
    ``head.weight.data.mul_(init_scale)``). timm's ``trunc_normal_`` cuts at +-2 absolute, which a
    std of 0.02 or below never reaches, so a plain normal draws the same distribution."""
    with torch.no_grad():
        if std > 0:
            fc.weight.copy_(torch.empty(fc.weight.shape).normal_(0, std, generator=g))
            fc.bias.zero_()
        if scale != 1.0:
            fc.weight.mul_(scale)
            fc.bias.mul_(scale)


def soft_cross_entropy(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c t_c log softmax(logits)_c: (B, classes), (B, classes) -> ()."""
    return -(t * F.log_softmax(logits, 1)).sum(1).mean()


def autocast(device: torch.device, precision: str) -> Any:
    """The training forward's autocast context (fp32: none)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def accumulated_step(forward: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer,
                     micro: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device, precision: str,
                     scaler: Any = None) -> torch.Tensor:
    """One optimiser step on the micro-batches ``micro`` [(x (b_i, C, H, W), soft targets (b_i, classes))]:
    each loss weighted by b_i / sum b (MAE's ``loss /= accum_iter`` for equal b_i), gradients summed,
    so the step is the one of the concatenated batch. Returns the last micro-batch's (unweighted) loss."""
    n = sum(len(x) for x, _ in micro)
    opt.zero_grad(set_to_none=True)
    loss = torch.tensor(math.nan)
    for x, t in micro:
        with autocast(device, precision):
            logits = forward(x).float()  # (b, classes)
        loss = soft_cross_entropy(logits, t)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"finetune: loss is {loss.item()} (lower finetune.lr)")
        weighted = loss if len(micro) == 1 else loss * (len(x) / n)
        (weighted if scaler is None else scaler.scale(weighted)).backward()
    if scaler is None:
        opt.step()
    else:  # fp16: unscale, skip the step on inf / NaN gradients, adapt the scale (torch.cuda.amp's recipe)
        scaler.step(opt)
        scaler.update()
    return loss


def finetune_lr(step: int, peak: float, warm: int, total: int, min_lr: float) -> float:
    """The lr at optimiser step ``step`` (before a group's layer-decay scale): linear warm-up peak x step /
    warm, then min_lr + (peak - min_lr) (1 + cos(pi (step - warm) / (total - warm))) / 2 (MAE's
    ``lr_sched.adjust_learning_rate`` at per-step resolution; BEiT's ``cosine_scheduler`` to ``--min_lr``)."""
    if step < warm:
        return peak * step / warm
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))


def finetune(backbone: nn.Module, data: Any, cfg: Any, device: torch.device, seed: int,
             head: tuple[nn.Module, int] | None = None) -> dict[str, Any]:
    """Fine-tune ``backbone`` (a loaded ``selfsup.models.backbones.Backbone``, changed in place) with a new linear
    classifier on ``data``'s labelled training split as ``cfg.finetune`` says; returns {top1, top5,
    final_loss, protocol} on the test split. ``head``: (the hidden layers of the method's projection head
    fine-tuned between the backbone and the classifier, their output width) (SimCLR v2 sec. 2:
    ``finetune.head_layers``, ``selfsup.models.heads.hidden_layers``); None: the classifier reads the backbone."""
    from selfsup.models.features import extract_features
    from selfsup.models.backbones import vit_trunk
    from selfsup.engine.optim import build_optimizer
    from selfsup.engine.schedules import lr_scale
    from selfsup.data.batches import batch_maker  # the training loop's loader + device augmentation

    c = cfg.finetune
    num_classes = len(data.meta["classes"])
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout inside the ViT blocks
    vit = vit_trunk(backbone)
    model = nn.Module()
    model.backbone = MeanPool(backbone) if c.pool == "mean" and vit is not None else backbone
    model.head = head[0] if head is not None else nn.Identity()  # ViT layer decay: the classifier's layer
    model.fc = nn.Linear(head[1] if head is not None else backbone.out_dim, num_classes)
    init_head(model.fc, c.head_init_std, c.head_init_scale, g)
    model.to(device)
    for p in model.parameters():  # everything trains, a frozen patch projection included
        p.requires_grad_(True)
    for m in backbone.front():  # but not the fixed front end (Sobel, colourisation's L adapter)
        for p in m.parameters():
            p.requires_grad_(False)
    depth = len(vit.vit.encoder.layers) if vit is not None else None
    if vit is not None:
        vit.unshare_rel_pos_bias()  # BEiT: the shared table copied into every block (no-op otherwise)
        vit.set_drop_path(c.drop_path)
    groups = param_groups_lrd(model, c.weight_decay, c.layer_decay, depth)
    base_lr = c.lr * lr_scale(c.lr_scaling, c.batch_size, 256)  # the global batch of a step
    opt = build_optimizer(groups, c)
    scaler = torch.amp.GradScaler(device.type) if c.precision == "fp16" else None
    ra = c.randaugment_params()
    aug = RandAug(*ra, data.meta["mean"]) if ra is not None else None
    spec = ViewSpec(count=1, size=0, crop=True, scale=tuple(c.crop_scale), flip_p=0.5 if c.flip else 0.0)
    make = batch_maker(cfg, data, device)
    micro = min(c.micro_batch or c.batch_size, c.batch_size)  # images per forward / backward
    steps_per_epoch = max(math.ceil(int((data.train.y >= 0).sum()) / c.batch_size), 1)  # optimiser steps
    total, warm = c.epochs * steps_per_epoch, c.warmup_epochs * steps_per_epoch
    step, loss = 0, torch.tensor(math.nan)

    def forward(x: torch.Tensor) -> torch.Tensor:  # (b, C, H, W) -> (b, classes)
        return model.fc(model.head(model.backbone(x)).float())

    def steps(ep: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per optimiser step: the loader batch of ``batch_size`` images as micro-batches of ``micro``,
        each transformed and mixed on its own (x (b, C, H, W), soft targets (b, classes))."""
        for i, batch in enumerate(make([spec], derive_seed(seed, "finetune", ep), c.batch_size)):
            keep = batch.y >= 0
            if not keep.any():
                continue
            out = []
            for j, (x, y) in enumerate(zip(batch.x[keep].split(micro), batch.y[keep].split(micro))):
                x = timm_train_transform(x, c, data.meta["mean"], data.meta["std"], aug,
                                         derive_seed(seed, "finetune-aug", ep, i, j))
                out.append(mix_batch(x, y, num_classes, c, g))
            yield out

    for ep in tqdm(range(c.epochs), desc="finetune", unit="ep", leave=False, mininterval=2):
        model.train()
        for micro_list in steps(ep):
            lr = finetune_lr(step, base_lr, warm, total, c.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            try:
                loss = accumulated_step(forward, opt, micro_list, device, c.precision, scaler)
            except FloatingPointError as e:
                raise FloatingPointError(f"{e} at epoch {ep}") from None
            step += 1
    model.eval()
    net = nn.Sequential(model.backbone, model.head, model.fc)
    m = data.test.y >= 0
    logits = extract_features(net, data.test, data.meta, device, cfg.extract.batch_size, desc="finetune test",
                              workers=cfg.workers, resize=cfg.dataset.resize_size, crop=cfg.dataset.crop_size)
    out = {"top1": 100.0 * topk_accuracy(logits[m], data.test.y[m], 1), "final_loss": float(loss.item()),
           "protocol": protocol_text(c, depth, model.head if head is not None else None)}
    if num_classes >= 5:
        out["top5"] = 100.0 * topk_accuracy(logits[m], data.test.y[m], 5)
    return out


def protocol_text(c: Any, depth: int | None, head: nn.Module | None) -> str:
    """The metrics' one-line description of the recipe (the keys at their defaults add nothing)."""
    text = (f"fine-tuning: {c.optimizer} lr {c.lr} x B/256, {c.epochs} epochs, layer decay "
            f"{c.layer_decay if depth else 'n/a (conv net)'}, drop path {c.drop_path if depth else 'n/a'}, "
            f"smoothing {c.label_smoothing}, mixup {c.mixup}, cutmix {c.cutmix}")
    extra = [f"{c.precision} autocast" if c.precision != "fp32" else "",
             f"micro-batches of {c.micro_batch} (B = {c.batch_size})" if 0 < c.micro_batch < c.batch_size else "",
             f"cosine to {c.min_lr}" if c.min_lr else "",
             f"RandAugment {c.randaugment}" if c.randaugment else "", f"random erasing {c.reprob}" if c.reprob else "",
             "mean-pooled patch tokens + fc_norm" if c.pool == "mean" and depth else "",
             f"head init N(0, {c.head_init_std}) x {c.head_init_scale}"
             if (c.head_init_std, c.head_init_scale) != (0.01, 1.0) else ""]
    text += "".join(f", {e}" for e in extra if e)
    if head is not None:
        text += f", from hidden layer {len([m for m in head if isinstance(m, nn.ReLU)])} of the projection head"
    return text

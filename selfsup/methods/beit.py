"""BEiT (Bao, Dong, Piao, Wei, "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022): masked image
modelling with visual tokens (sec. 2), as the official code (microsoft/unilm ``beit/``:
``modeling_pretrain.py``, ``engine_for_pretraining.py``, ``masking_generator.py``) does it.

- Visual tokens (sec. 2.1.2): a frozen tokeniser read from the UPSTREAM file (``methods.beit``, written by
  the ``tokenizer`` stage, ``selfsup/models/tokenizer.py``: DALL-E's dVAE encoder as the paper, or a VQ-VAE trained
  by the pipeline) maps the view to one token per ViT patch; eval mode, no gradient, outside the module's
  state (not in checkpoints: the run key holds the file's hash, and a resumed run reloads it). Its
  ``patch`` must equal the ViT's and its vocabulary ``vocab``. The tokens are of the same crop the ViT
  sees. ``tokenizer_view`` (DALL-E tokeniser only, which reads 8 px per token): "lanczos", the official
  second view's size and filter (microsoft/unilm@768a3c8 ``run_beit_pretraining.py`` ``--second_input_size
  112 --second_interpolation lanczos``: 112 px for 14 x 14 tokens), resampled here from the training crop
  rather than from the original image; "bilinear", the earlier antialiased bilinear resize. The ``vq``
  tokeniser reads the crop at the ViT's own patch size, so the key changes nothing there.
- Masking (sec. 2.3, Algorithm 1; sec. 2.5): blockwise, ``selfsup.augment.masking.block_masks``: blocks of at least
  ``min_block`` patches with aspect ratio in [``min_aspect``, 1 / ``min_aspect``] until ``mask_ratio`` of
  the patches are masked (paper: 40 %, min 16 of 14 x 14; official: 75 patches, 38 %), one mask per image,
  drawn from a generator seeded by the loop's per-step seed (a resumed run draws the same masks).
  ``mask_fill``: "official" (``masking_generator.py`` try for try: stops when no block fits, a little
  short of the count) or "complete" (the earlier rule: halves the minimum block and reaches the count).
- Network (``VisionTransformerForMaskedImageModeling`` in ``modeling_pretrain.py``): the ViT's patch
  embedding (``conv_proj``), masked positions replaced by a learned ``mask_token`` (x (1 - m) + mask_token
  m), the CLS token prepended, BEiT's transformer blocks (``selfsup.models.backbones.BEiTBlock``: layer scale
  ``layer_scale_init``, official 0.1 for ViT-B, ``--layer_scale_init_value``; q / v biases) with
  ``rel_pos_bias`` "shared": one relative position bias for all blocks and no absolute position
  embedding (``use_shared_rel_pos_bias`` True, ``use_abs_pos_emb`` False), the final LayerNorm, then
  ``lm_head``, a Linear from the normed hidden states to ``vocab`` logits, at the masked positions only.
  ``rel_pos_bias`` "none" with ``layer_scale_init`` 0 keeps torchvision's blocks and learned absolute
  embedding (the earlier network). Init (``init`` "beit", official ``_init_weights``): every Linear and
  the patch projection trunc-normal std 0.02 cut at +-0.02, biases 0, the CLS token, mask token and
  lm_head weight likewise; ``init_rescale``: each block's attention and MLP output projection divided by
  sqrt(2 l) (sec. 2.5, ``fix_init_weight``). The saved trunk records the blocks (``ViT.options``), so the
  evaluations rebuild it; fine-tuning copies the shared bias into every block as the official
  ``run_class_finetuning.py`` does.
- Stochastic depth (``drop_path``, official ``--drop_path 0.1`` in ``run_beit_pretraining.py``): the
  backbone's ``set_drop_path``, rising linearly over the blocks to ``drop_path`` (timm's rule, as the
  official ``modeling_pretrain.py``), in train mode only; it adds no parameter, so the saved trunk loads
  the same either way (fine-tuning sets its own ``finetune.drop_path``).
- Loss (eq. 1): cross-entropy against the tokeniser's ids at the masked positions, averaged over all the
  masked positions of the batch (official ``nn.CrossEntropyLoss()(outputs, labels)``); ``mlm_acc`` logged.
- Optimiser (sec. 2.5, appendix G): AdamW lr 1.5e-3 (batch 2048, no scaling), betas (0.9, 0.999) (the
  paper and ``run_beit_pretraining.py``'s default at 768a3c8, which the README command keeps; the earlier
  commit 03380c8 defaulted to (0.9, 0.98)), weight decay 0.05 (none on 1-d parameters (biases, norms, the
  q / v biases, the layer scales), the CLS token and the position embedding: the official
  ``get_parameter_groups`` with ``no_weight_decay`` {pos_embed, cls_token}; the mask token and the shared
  relative position bias table decay as there), 10 warm-up epochs from 0 (``warmup_start_lr``:
  the ``--warmup_lr 1e-6`` flag is never passed to ``utils.cosine_scheduler``) then cosine to 1e-5, gradient clipping 3.0, 800 epochs on ImageNet-1k. Augmentation: random
  resized crop, flip, colour jitter 0.4 (appendix G; brightness, contrast, saturation, always applied, as
  ``ColorJitter(0.4, 0.4, 0.4)`` in copies of the original ``DataAugmentationForBEiT``; the stored official
  ``datasets.py`` at 03380c8 has no jitter).
- Differences: the tokeniser's second view is resampled from the training crop (above). The mask
  generator runs in the training process (official: data-loader workers).
- The saved encoder is the backbone; the evaluations read its CLS token after the final norm, which the
  MIM loss never supervises directly. The paper's linear probe (appendix D) averages the patch tokens of an
  intermediate block (block 9 of 12 for BEiT-B) instead, and its headline protocol is fine-tuning
  (``finetune:``, where the paper also averages patch tokens): expect weak kNN / linear numbers from the CLS
  token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.core.config import ConfigError, non_negative, one_of, positive
from selfsup.engine.config import TrainCfg
from selfsup.data.prepared import Data
from selfsup.core.io import InputError
from selfsup.augment.masking import FILLS, block_masks
from selfsup.methods import register
from selfsup.engine.contract import Batch, EpochPlan, Method, StepOut, TrainContext
from selfsup.models.backbones import VITS, require_vit, vit_trunk
from selfsup.models.tokenizer import RESAMPLES, DalleTokenizer, Tokenizer, load_tokenizer


@dataclass
class BEiTCfg(TrainCfg):
    # the paper's ImageNet-1k ViT-B/16 values (appendix G); params.yaml has the digits ones
    backbone: str = "vit_base"
    epochs: int = 800
    batch_size: int = 128  # per process: official 128 x 16 GPUs = 2048
    optimizer: str = "adamw"
    lr: float = 1.5e-3  # for the global batch 2048, no scaling (official)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.05
    exclude_norm_bias: bool = True  # + the CLS token and the position embedding (official no_weight_decay)
    lr_schedule: str = "cosine"
    min_lr: float = 1e-5
    warmup_epochs: float = 10.0
    clip_grad: float = 3.0
    augment: str = "crop_flip"
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.0])
    jitter_p: float = 1.0  # official ColorJitter(0.4, 0.4, 0.4), always
    vocab: int = 8192  # the tokeniser's vocabulary (DALL-E: 8192); checked against the upstream file
    mask_ratio: float = 0.4  # paper 40 % (official --num_mask_patches 75 of 196)
    min_block: int = 16  # patches per block at least (official --min_mask_patches_per_block)
    min_aspect: float = 0.3
    drop_path: float = 0.1  # stochastic depth of the last block (official --drop_path 0.1); 0: none
    # the warm-up starts at 0: run_beit_pretraining.py parses --warmup_lr 1e-6 but never passes it to
    # utils.cosine_scheduler, whose start_warmup_value defaults to 0 (microsoft/unilm@768a3c8)
    warmup_start_lr: float = 0.0
    # the transformer (microsoft/unilm@768a3c8 run_beit_pretraining.py, modeling_pretrain.py): shared: one
    # relative position bias for all blocks, no absolute position embedding (rel_pos_bias True, abs_pos_emb
    # False); none: torchvision's learned absolute embedding, no bias
    rel_pos_bias: str = "shared"
    layer_scale_init: float = 0.1  # --layer_scale_init_value (0.1 for base, 1e-5 for large); 0: no layer scale
    init: str = "beit"  # beit: trunc-normal(0.02) cut at +-0.02 (_init_weights) | torchvision: as built
    init_rescale: bool = True  # fix_init_weight: block l's output projections / sqrt(2 l) (paper sec. 2.5)
    # official: masking_generator.py, stops when no block fits (a little short) | complete: reaches the count
    mask_fill: str = "official"
    # the DALL-E tokeniser's view: lanczos (--second_interpolation lanczos, 8 px per token) | bilinear
    tokenizer_view: str = "lanczos"

    def check(self, p: str) -> None:
        super().check(p)
        positive(p, self, "vocab", "min_block", "min_aspect")
        one_of(p, "rel_pos_bias", self.rel_pos_bias, ("shared", "none"))
        one_of(p, "init", self.init, ("beit", "torchvision"))
        one_of(p, "mask_fill", self.mask_fill, FILLS)
        one_of(p, "tokenizer_view", self.tokenizer_view, RESAMPLES)
        non_negative(p, self, "layer_scale_init")
        if self.vocab < 2:
            raise ConfigError(f"{p}.vocab: at least 2 tokens, got {self.vocab}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"{p}.mask_ratio: a fraction in (0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"{p}.drop_path: a probability in [0, 1), got {self.drop_path}")
        if self.min_aspect > 1.0:
            raise ConfigError(f"{p}.min_aspect: in (0, 1] (blocks take aspect ratios up to 1 / min_aspect), "
                              f"got {self.min_aspect}")


@register
class BEiT(Method):
    name = "beit"
    Config = BEiTCfg
    uses_upstream = True

    def __init__(self, backbone: Any, cfg: BEiTCfg, num_classes: int):
        super().__init__(backbone, cfg, num_classes)
        vit = require_vit(backbone, "beit.backbone", "BEiT masks the patch tokens of a Vision Transformer")
        if backbone.front():
            raise ConfigError("beit.sobel: BEiT's patch embedding takes the images themselves; set it to false")
        if cfg.rel_pos_bias != "none" or cfg.layer_scale_init > 0:  # BEiT's blocks; else torchvision's
            vit.use_beit_blocks(cfg.layer_scale_init, cfg.rel_pos_bias)
        if cfg.init == "beit":
            vit.init_beit(0.02)
        if cfg.init_rescale:
            vit.rescale_block_outputs()
        if cfg.drop_path:  # 0 leaves the blocks as built
            vit.set_drop_path(cfg.drop_path)
        dim = vit.out_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.lm_head = nn.Linear(dim, cfg.vocab)
        with torch.no_grad():  # official: trunc_normal_(std=0.02) in [-0.02, 0.02], bias 0
            nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
            nn.init.trunc_normal_(self.lm_head.weight, std=0.02, a=-0.02, b=0.02)
            nn.init.zeros_(self.lm_head.bias)
        # the frozen tokeniser: set at the first epoch start / on resume, kept out of the module's
        # parameters, state_dict and DDP (object.__setattr__ skips nn.Module's registration)
        object.__setattr__(self, "tokenizer", None)

    @classmethod
    def validate(cls, cfg: BEiTCfg, data: Data, feat_dim: int) -> None:
        if cfg.backbone and cfg.backbone not in VITS:
            raise ConfigError(f"beit.backbone: BEiT needs a Vision Transformer ({', '.join(VITS)}), got {cfg.backbone}")

    @property
    def vit(self) -> Any:
        return vit_trunk(self.backbone)

    # ------------------------------------------------------------------ the tokeniser
    def set_tokenizer(self, tok: Tokenizer, meta: dict[str, Any] | None = None, where: str = "tokenizer") -> None:
        """Check ``tok`` against the ViT and the data, freeze it and use it."""
        c, vit = self.cfg, self.vit
        if tok.patch != vit.patch:
            raise ConfigError(f"tokenizer.patch: the tokeniser {where} has {tok.patch} px tokens, the ViT "
                              f"{vit.patch} px patches (one token per patch)")
        if tok.vocab_size != c.vocab:
            raise ConfigError(f"beit.vocab: {c.vocab}, but the tokeniser {where} has {tok.vocab_size} tokens")
        if meta is not None:
            same = tok.channels == meta["channels"] and all(
                abs(a - b) < 1e-6 for a, b in zip([*tok.mean, *tok.std], [*meta["mean"], *meta["std"]]))
            if not same:
                raise InputError(f"{where}: the tokeniser was made for another dataset ({tok.channels} channels, "
                                 f"mean {tok.mean}); re-run the tokenizer stage on this one")
        for p in tok.parameters():
            p.requires_grad_(False)
        if isinstance(tok, DalleTokenizer):
            tok.resample = c.tokenizer_view
        object.__setattr__(self, "tokenizer", tok.eval())

    def _load(self, ctx: TrainContext) -> None:
        if ctx.upstream is None:
            raise ConfigError("methods.beit: BEiT predicts the tokens of a visual tokeniser; set it to the "
                              "tokenizer stage's file data/tokenizer/tokenizer.pt (or another tokeniser file)")
        self.set_tokenizer(load_tokenizer(ctx.upstream, ctx.device), ctx.data.meta, str(ctx.upstream))

    def on_epoch_start(self, epoch: int, ctx: TrainContext) -> EpochPlan:
        if self.tokenizer is None:
            self._load(ctx)
        return EpochPlan()

    def on_resume(self, ctx: TrainContext) -> None:
        self._load(ctx)

    def param_groups(self) -> list[dict[str, Any]]:
        """[decayed, not decayed]: as the official ``get_parameter_groups`` with ``no_weight_decay``
        {pos_embed, cls_token}: 1-d parameters (biases, LayerNorms, q / v biases, layer scales), the CLS
        token and an absolute position embedding are not decayed; the relative position bias table (2-d),
        the mask token and every weight matrix are."""
        c = self.cfg
        decay, no_decay = [], []
        for n, p in self.named_parameters():
            if not p.requires_grad:
                continue
            skip = c.exclude_norm_bias and (p.ndim <= 1 or n.endswith((".class_token", ".pos_embedding")))
            (no_decay if skip else decay).append(p)
        groups = [{"params": decay, "weight_decay": c.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]
        return [g for g in groups if g["params"]]

    # ------------------------------------------------------------------ the loss
    def masks(self, batch: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(B, h w) bool blockwise masks from a generator seeded off the global RNG (the loop seeds it per
        step, so a resumed run draws the same masks)."""
        c = self.cfg
        g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, ())))
        return block_masks(batch, h, w, c.mask_ratio, g, c.min_block, c.min_aspect, c.mask_fill).to(device)

    def encode_masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B, h w) bool -> (B, h w, D) final normed hidden states of the patches, the masked
        ones' embeddings replaced by the mask token."""
        vit = self.vit
        v = vit.vit
        t = v.conv_proj(x)  # (B, D, h, w)
        b, _, h, w = t.shape
        t = t.flatten(2).transpose(1, 2)  # (B, N, D)
        m = mask.unsqueeze(-1).to(t.dtype)  # (B, N, 1)
        t = t * (1 - m) + self.mask_token.to(t.dtype).expand(b, t.shape[1], -1) * m
        t = torch.cat([v.class_token.expand(b, -1, -1).to(t.dtype), t], 1)  # (B, 1 + N, D)
        pe = vit.pos_embed(h, w)  # None with the relative position bias
        t = v.encoder.dropout(t if pe is None else t + pe)
        for t in vit.run_blocks(t, h, w, tap=False):  # (B, 1 + N, D) after each block
            pass
        return v.encoder.ln(t)[:, 1:]

    def forward(self, batch: Batch) -> StepOut:
        if self.tokenizer is None:
            raise RuntimeError("beit: no tokeniser (on_epoch_start / on_resume load it from the upstream file)")
        x = batch.x  # (B, C, S, S)
        ids = self.tokenizer.encode(x)  # (B, h w), no gradient, fp32
        h, w = self.tokenizer.grid(x.shape[2], x.shape[3])
        mask = self.masks(len(x), h, w, x.device)  # (B, h w)
        hid = self.encode_masked(x, mask)  # (B, h w, D)
        if hid.shape[1] != ids.shape[1]:
            raise ConfigError(f"tokenizer.patch: {ids.shape[1]} tokens but {hid.shape[1]} ViT patches")
        logits = self.lm_head(hid[mask]).float()  # (M, vocab), the masked positions only
        target = ids[mask]  # (M,)
        loss = F.cross_entropy(logits, target)
        with torch.no_grad():
            acc = (logits.argmax(1) == target).float().mean()
        return StepOut(loss, {"mlm_acc": acc, "masked_frac": mask.float().mean()})

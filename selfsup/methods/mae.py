"""MAE (He, Chen, Xie, Li, Dollár, Girshick, "Masked Autoencoders Are Scalable Vision Learners",
CVPR 2022): mask a random 75 % of a ViT's patches, encode only the visible ones, and let a light
decoder reconstruct the pixels of the masked ones (sec. 3).

- Masking (sec. 3 "Masking"): per image a uniform random subset (``selfsup.augment.masking.random_mask``,
  drawn from the loop's seeded RNG, so a resumed run draws the same masks).
- Encoder (sec. 3 "MAE encoder"): the backbone's ViT on the visible patches only, with their position
  embeddings and the CLS token (the official code keeps the CLS token as a dummy during
  pre-training; it is what our evaluations read afterwards), its blocks and final LayerNorm.
- Decoder (sec. 3 "MAE decoder"): Linear to ``decoder_dim``, a shared learned mask token at the masked
  positions, fixed 2-D sin-cos position embeddings (official ``get_2d_sincos_pos_embed``), ``decoder_depth``
  transformer blocks (torchvision's ``EncoderBlock``: pre-norm, GELU MLP of ``decoder_mlp``, q, k, v
  projections with bias as the official timm ``Block(..., qkv_bias=True)``), LayerNorm,
  and a Linear to the p x p x C pixels of each patch. Paper sizes (Table 1a/b): 512-d, 8 blocks, 16
  heads; the decoder exists only for pre-training (not saved with the encoder).
- Target and loss (sec. 3 "Reconstruction target"): the patch's pixels, normalised by the patch's own
  mean and variance with ``norm_pix_loss`` (the official default for the paper's best numbers, Table
  1c), mean squared error over the masked patches only.
- Encoder position embedding (``pos_embed``): sincos, the official fixed 2-D sin-cos table
  (``models_mae.py``: ``get_2d_sincos_pos_embed``, ``requires_grad=False``; ``ViT.fix_sincos_pos_embed``),
  not trained and not decayed; learned: torchvision's trained one.
- Init (``init``): xavier_uniform, the official ``initialize_weights`` (facebookresearch/mae@efb2a80
  ``models_mae.py``): every Linear of encoder and decoder xavier-uniform with bias 0 (the fused q, k, v
  projection as one (3 D, D) matrix, as timm's qkv Linear), the patch projection xavier-uniform as a
  Linear on its flattened weight, LayerNorms 1 / 0, the CLS and mask tokens N(0, 0.02)
  (``ViT.init_mae``); torchvision: the backbone as built (the earlier behaviour).
- Weight decay (``exclude_norm_bias``): none on 1-d parameters (biases, LayerNorms), every other trained
  tensor decayed, the CLS and mask tokens included: the official ``optim_factory.add_weight_decay``
  (timm 0.3.2) with an empty skip list; the fixed sin-cos tables are not trained, so not in the optimiser.
- Official ImageNet pre-training (``main_pretrain.py``, PRETRAIN.md): ViT-B/16 (or L / H), AdamW with
  base lr 1.5e-4 x batch / 256 (batch 4096: 2.4e-3), betas (0.9, 0.95), weight decay 0.05, 40 warm-up
  epochs then cosine, 800 or 1600 epochs, random resized crop scale (0.2, 1) + flip only.
- Pictures (``reports/mae.png``): test images masked, reconstructed (the visible patches pasted over the
  prediction, as the paper's Fig. 2) and the originals.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from selfsup.core.config import ConfigError, one_of, positive
from selfsup.engine.config import TrainCfg
from selfsup.augment.masking import patchify, random_mask, unpatchify
from selfsup.losses.mae import mae_loss
from selfsup.methods import register
from selfsup.engine.contract import Batch, Method, StepOut
from selfsup.models.backbones import sincos_pos_embed  # the decoder's table, and the encoder's with pos_embed sincos


@dataclass
class MAECfg(TrainCfg):
    epochs: int = 800  # facebookresearch/mae PRETRAIN.md (the released checkpoints: 1600)
    optimizer: str = "adamw"
    lr: float = 1.5e-4  # the base lr at batch 256 (lr_scaling linear)
    lr_scaling: str = "linear"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.05
    exclude_norm_bias: bool = True
    lr_schedule: str = "cosine"
    warmup_epochs: float = 40.0
    augment: str = "crop_flip"
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp: int = 2048
    norm_pix_loss: bool = True
    pos_embed: str = "sincos"  # encoder: sincos (official fixed 2-D sin-cos, not trained) | learned
    # xavier_uniform: models_mae.py initialize_weights (Linear + patch projection xavier, tokens N(0, 0.02))
    # | torchvision: the ViT as torchvision builds it
    init: str = "xavier_uniform"
    picture_images: int = 8  # test images in reports/mae.png

    def check(self, p: str) -> None:
        super().check(p)
        positive(p, self, "decoder_dim", "decoder_depth", "decoder_heads", "decoder_mlp", "picture_images")
        one_of(p, "pos_embed", self.pos_embed, ("sincos", "learned"))
        one_of(p, "init", self.init, ("xavier_uniform", "torchvision"))
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"{p}.mask_ratio: need 0 < mask_ratio < 1, got {self.mask_ratio}")
        if self.decoder_dim % self.decoder_heads:
            raise ConfigError(f"{p}.decoder_heads: {self.decoder_heads} must divide decoder_dim {self.decoder_dim}")


@register
class MAE(Method):
    name = "mae"
    Config = MAECfg
    pictures: ClassVar[tuple[str, ...]] = ("mae.png",)

    def __init__(self, backbone: Any, cfg: MAECfg, num_classes: int):
        super().__init__(backbone, cfg, num_classes)
        from torchvision.models.vision_transformer import EncoderBlock

        from selfsup.models.backbones import require_vit, vit_trunk

        vit = require_vit(backbone, f"{self.name}.backbone", "MAE masks and reconstructs a ViT's patches")
        if backbone.front():
            raise ConfigError(f"{self.name}.sobel: MAE reconstructs the input pixels; a fixed front end is not "
                              "supported")
        if cfg.pos_embed == "sincos":  # official: fixed, the MAE half order (first half the column)
            vit.fix_sincos_pos_embed("w")
        d, dd = vit.out_dim, cfg.decoder_dim
        self.patch = vit.patch
        self.channels = vit.patch_embed.in_channels
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        nn.init.normal_(self.mask_token, std=0.02)  # official: normal, std 0.02
        self.decoder_blocks = nn.Sequential(*[
            EncoderBlock(cfg.decoder_heads, dd, cfg.decoder_mlp, dropout=0.0, attention_dropout=0.0)
            for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, self.patch ** 2 * self.channels)
        if cfg.init == "xavier_uniform":
            self.init_official()
        self.register_buffer("mean", torch.zeros(self.channels, 1, 1), persistent=False)  # for the pictures
        self.register_buffer("std", torch.ones(self.channels, 1, 1), persistent=False)

    def init_official(self) -> None:
        """``models_mae.py`` ``initialize_weights``: the encoder's (``ViT.init_mae``: xavier-uniform Linears
        and patch projection, CLS token N(0, 0.02)), then the decoder's Linears (q, k, v fused, as timm's)
        xavier-uniform with bias 0, its LayerNorms 1 / 0 and the mask token N(0, 0.02)."""
        from selfsup.models.backbones import vit_trunk

        vit_trunk(self.backbone).init_mae()
        with torch.no_grad():
            for m in [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]:
                for sub in m.modules():
                    if isinstance(sub, nn.MultiheadAttention):
                        nn.init.xavier_uniform_(sub.in_proj_weight)  # (3 Dd, Dd) as one matrix
                        nn.init.zeros_(sub.in_proj_bias)
                    elif isinstance(sub, nn.Linear):  # out_proj, the MLPs, decoder_embed, decoder_pred
                        nn.init.xavier_uniform_(sub.weight)
                        nn.init.zeros_(sub.bias)
                    elif isinstance(sub, nn.LayerNorm):
                        nn.init.ones_(sub.weight)
                        nn.init.zeros_(sub.bias)
            nn.init.normal_(self.mask_token, std=0.02)

    @classmethod
    def from_data(cls, backbone: Any, cfg: Any, data: Any) -> "MAE":
        m = cls(backbone, cfg, data.num_classes)
        m.mean.copy_(torch.tensor(data.meta["mean"], dtype=torch.float32).view(-1, 1, 1))
        m.std.copy_(torch.tensor(data.meta["std"], dtype=torch.float32).view(-1, 1, 1))
        return m

    # ------------------------------------------------------------------ the model
    def encode(self, x: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(B, C, H, W), ids_keep (B, K) -> (latent (B, 1 + K, D) after the final norm, h, w)."""
        vit = self.backbone.trunk
        v = vit.vit
        t = v.conv_proj(x)  # (B, D, h, w)
        b, d, h, w = t.shape
        pe = vit.pos_embed(h, w)  # (1, 1 + h w, D)
        t = t.flatten(2).transpose(1, 2) + pe[:, 1:]  # (B, N, D)
        t = t.gather(1, ids_keep[..., None].expand(-1, -1, d))  # (B, K, D): the visible patches only
        cls = v.class_token + pe[:, :1]  # (1, 1, D)
        t = torch.cat([cls.expand(b, -1, -1), t], 1)  # (B, 1 + K, D)
        t = v.encoder.dropout(t)
        for block in v.encoder.layers:
            t = block(t)
        return v.encoder.ln(t), h, w

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """latent (B, 1 + K, D), ids_restore (B, N) -> (B, N, p p C) predicted pixels of every patch."""
        t = self.decoder_embed(latent)  # (B, 1 + K, Dd)
        b, k1, dd = t.shape
        n = ids_restore.shape[1]
        masked = self.mask_token.expand(b, n + 1 - k1, -1)  # (B, N - K, Dd)
        seq = torch.cat([t[:, 1:], masked], 1)  # (B, N, Dd) in shuffled order
        seq = seq.gather(1, ids_restore[..., None].expand(-1, -1, dd))  # back in the patches' order
        seq = torch.cat([t[:, :1], seq], 1)  # (B, 1 + N, Dd)
        seq = seq + sincos_pos_embed(dd, h, w).to(seq)[None]
        seq = self.decoder_norm(self.decoder_blocks(seq))
        return self.decoder_pred(seq[:, 1:])  # (B, N, p p C)

    def reconstruct(self, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pred (B, N, p p C), target patches (B, N, p p C), mask (B, N)) for views ``x``."""
        p = self.patch
        h, w = x.shape[-2] // p, x.shape[-1] // p
        ids_keep, mask, ids_restore = random_mask(len(x), h * w, self.cfg.mask_ratio, g, x.device)
        latent, h, w = self.encode(x, ids_keep)
        return self.decode(latent, ids_restore, h, w), patchify(x, p), mask

    def forward(self, batch: Batch) -> StepOut:
        x = batch.x  # (B, C, H, W)
        # the masks from the loop's RNG (seeded per run, epoch, batch and rank): resumable
        g = torch.Generator().manual_seed(int(torch.randint(2 ** 62, ())))
        pred, target, mask = self.reconstruct(x, g)
        loss = mae_loss(pred.float(), target.float(), mask, self.cfg.norm_pix_loss)
        return StepOut(loss, {"masked": mask.mean()})

    # ------------------------------------------------------------------ pictures
    @torch.no_grad()
    def render_pictures(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """(N, C, S, S) normalised test images -> {"mae.png": uint8 (3S', N S', 3)}: rows are the masked
        inputs (masked patches grey), the reconstructions with the visible patches pasted in, and the
        originals; S' = the patch grid's side. With ``norm_pix_loss`` the predicted patches are mapped
        back with the true patch's mean and variance (the official visualisation does the same)."""
        was = self.training
        self.eval()
        p, c = self.patch, self.channels
        h, w = images.shape[-2] // p, images.shape[-1] // p
        x = images[..., :h * p, :w * p].float()
        pred, target, mask = self.reconstruct(x, torch.Generator().manual_seed(0))
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        m = mask[..., None]  # (N, n, 1)
        masked = unpatchify(target * (1 - m), p, c, h, w)
        recon = unpatchify(target * (1 - m) + pred * m, p, c, h, w)
        rows = []
        for r in (masked, recon, x):
            img = (r * self.std + self.mean).clamp(0, 1)  # (N, C, S, S) in [0, 1]
            if c == 1:
                img = img.expand(-1, 3, -1, -1)
            rows.append(torch.cat(list(img), dim=2))  # (3, S, N S)
        grey = unpatchify((1 - m).expand_as(target), p, c, h, w)[:, :1].expand(-1, 3, -1, -1)  # 1 visible
        rows[0] = torch.where(torch.cat(list(grey), dim=2) > 0, rows[0], torch.full_like(rows[0], 0.5))
        self.train(was)
        grid = torch.cat(rows, dim=1).permute(1, 2, 0)  # (3S, N S, 3)
        return {"mae.png": (grid * 255).round().byte().cpu().numpy()}

    def param_groups(self) -> list[dict[str, Any]]:
        """The official ``optim_factory.add_weight_decay(model, weight_decay)`` (timm 0.3.2, no skip list):
        no weight decay on 1-d parameters (biases, LayerNorms) when ``exclude_norm_bias``; the CLS and
        mask tokens (3-d) are decayed; frozen tensors (the fixed sin-cos tables) are left out."""
        from selfsup.engine.optim import param_groups

        return [g for g in param_groups(self, self.cfg.weight_decay, self.cfg.exclude_norm_bias) if g["params"]]


__all__ = ["MAE", "MAECfg", "sincos_pos_embed"]

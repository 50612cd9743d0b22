"""Masked image modelling: the masks (MAE's random 75 %, BEiT's blockwise 40 %), MAE's encoder on the
visible patches only, its loss on the masked patches with per-patch normalised targets (against a slow
reference), the picture, a bit-exact resume and a short run on digits."""
import math

import numpy as np
import pytest
import torch

from conftest import assert_resume_is_exact, make_cfg
from selfsup.augment.masking import block_mask, block_masks, draw_block, patchify, random_mask, unpatchify
from selfsup.losses.mae import mae_loss
from selfsup.methods.mae import sincos_pos_embed

MAE_DIGITS = {"backbone": "vit_digits", "epochs": 2, "batch_size": 64, "lr": 1e-3, "warmup_epochs": 0,
              "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 4, "decoder_mlp": 64, "augment": "crop",
              "crop_scale": [0.5, 1.0]}


# ----------------------------------------------------------------- masks
def test_random_mask_keeps_a_quarter_and_restores_the_order():
    g = torch.Generator().manual_seed(0)
    keep, mask, restore = random_mask(5, 196, 0.75, g)
    assert keep.shape == (5, 49) and mask.shape == (5, 196) and (mask.sum(1) == 147).all()
    for b in range(5):
        assert set(keep[b].tolist()) == set(torch.nonzero(mask[b] == 0).flatten().tolist())
    shuffle = restore.argsort(1)
    assert torch.equal(shuffle[:, :49], keep)  # ids_restore undoes the shuffle whose head is kept
    assert not torch.equal(mask[0], mask[1])  # per image


def test_block_mask_hits_its_ratio():
    """BEiT on 14 x 14: 40 % of 196 = 78 patches, never more; digits' 4 x 4 with blocks of 2+: 6 of 16."""
    g = torch.Generator().manual_seed(0)
    counts = [int(block_mask(14, 14, 0.4, g, min_block=16).sum()) for _ in range(200)]
    assert max(counts) <= 78 and np.mean(counts) >= 0.97 * 78
    assert all(int(m.sum()) == 6 for m in block_masks(50, 4, 4, 0.4, g, min_block=2))
    with pytest.raises(ValueError, match="ratio"):
        block_mask(4, 4, 0.0, g)


def test_blocks_follow_the_papers_size_and_aspect_rule():
    """Each block: area ~ U(16, left) patches and aspect r with log r ~ U(log 0.3, log 1/0.3), sides
    round(sqrt(s r)) x round(sqrt(s / r)) (Algorithm 1); checked on 2,000 draws."""
    g = torch.Generator().manual_seed(1)
    areas, aspects = [], []
    for _ in range(2000):
        box = draw_block(14, 14, 16, 78, 0.3, g)
        if box is None:
            continue
        t, lft, bh, bw = box
        assert 0 <= t <= 14 - bh and 0 <= lft <= 14 - bw
        areas.append(bh * bw)
        aspects.append(bh / bw)
    areas, aspects = np.array(areas), np.array(aspects)
    # rounding the sides moves the area and aspect a little past the drawn ranges
    s_lo, s_hi = (math.sqrt(16) - 0.5) ** 2 * 0.8, (math.sqrt(78) + 0.5) ** 2 * 1.2
    assert areas.min() >= s_lo and areas.max() <= s_hi
    assert aspects.min() >= 0.3 * 0.6 and aspects.max() <= (1 / 0.3) / 0.6
    assert abs(np.log(aspects).mean()) < 0.1  # log-uniform, symmetric about 1
    assert (aspects > 1.5).mean() > 0.15 and (aspects < 1 / 1.5).mean() > 0.15  # tall and wide both drawn


def test_patchify_round_trip():
    x = torch.randn(2, 3, 8, 8)
    t = patchify(x, 2)
    assert t.shape == (2, 16, 12)
    assert torch.equal(t[0, 1], x[0, :, 0:2, 2:4].permute(1, 2, 0).flatten())  # row-major, (p, p, C)
    assert torch.equal(unpatchify(t, 2, 3, 4, 4), x)


# ----------------------------------------------------------------- MAE
def test_sincos_embedding_matches_the_formula():
    e = sincos_pos_embed(8, 2, 3)
    assert e.shape == (7, 8) and torch.equal(e[0], torch.zeros(8))
    # patch (row 1, col 2): the first half encodes the column, the second the row
    om = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2)
    ref = torch.cat([torch.sin(2 * om), torch.cos(2 * om), torch.sin(1 * om), torch.cos(1 * om)]).float()
    assert torch.allclose(e[1 + 1 * 3 + 2], ref, atol=1e-6)


def test_loss_is_the_masked_mean_of_normalised_patches():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 16, 12, generator=g), torch.randn(3, 16, 12, generator=g) * 3 + 1
    mask = (torch.rand(3, 16, generator=g) < 0.75).float()
    tot, n = 0.0, 0
    for b in range(3):  # slow reference: every masked patch, its own mean and unbiased variance
        for i in range(16):
            if mask[b, i]:
                t = target[b, i]
                tn = (t - t.mean()) / math.sqrt(float(t.var()) + 1e-6)
                tot += float(((pred[b, i] - tn) ** 2).mean())
                n += 1
    assert mae_loss(pred, target, mask, True).item() == pytest.approx(tot / n, rel=1e-5)
    raw = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert mae_loss(pred, target, mask, False).item() == pytest.approx(raw.item(), rel=1e-6)
    changed = pred.clone()
    changed[mask == 0] += 5.0  # visible patches: no effect on the loss
    assert mae_loss(changed, target, mask, True).item() == pytest.approx(tot / n, rel=1e-5)


def _mae(digits, **over):
    from selfsup.engine.loop import build_method

    return build_method(make_cfg(methods=["mae"], mae={**MAE_DIGITS, **over}), "mae", digits)


def test_encoder_sees_exactly_the_visible_patches(digits):
    m = _mae(digits).eval()
    x = torch.randn(4, 1, 8, 8)
    g = torch.Generator().manual_seed(3)
    keep, mask, restore = random_mask(4, 16, 0.75, g)
    lat, h, w = m.encode(x, keep)
    assert lat.shape == (4, 1 + 4, m.backbone.out_dim) and (h, w) == (4, 4)
    y = x.clone()
    pm = unpatchify(mask[..., None].expand(-1, -1, 4), 2, 1, 4, 4)  # (4, 1, 8, 8): 1 on masked pixels
    y[pm.bool()] = 100.0  # change every masked pixel
    with torch.no_grad():
        assert torch.allclose(m.encode(y, keep)[0], lat, atol=1e-6)
        x2 = x.clone()
        x2[~pm.bool()] += 1.0  # change the visible pixels: the latent changes
        assert not torch.allclose(m.encode(x2, keep)[0], lat, atol=1e-3)


def test_mae_errors_name_the_key(digits):
    from selfsup.core.config import ConfigError

    with pytest.raises(ConfigError, match="mae.backbone"):
        _mae(digits, backbone="smallcnn")
    with pytest.raises(ConfigError, match="mae.mask_ratio"):
        _mae(digits, mask_ratio=1.0)


def test_picture_and_a_short_run_lowers_the_loss(digits, tmp_path):
    from selfsup.engine.pictures import method_pictures
    from selfsup.engine.loop import pretrain

    cfg = make_cfg(methods=["mae"], mae={**MAE_DIGITS, "epochs": 4})
    m, hist = pretrain(cfg, "mae", digits, tmp_path / "ck.pt")
    assert hist[-1]["loss"] < hist[0]["loss"]
    pics = method_pictures(m, digits, torch.device("cpu"), 6)
    img = pics["mae.png"]
    assert img.dtype == np.uint8 and img.shape == (24, 48, 3)  # 3 rows of 8 px, 6 images
    assert (img[:8] == 128).any()  # masked patches drawn grey
    # the reconstruction row keeps the visible patches of the original row
    assert (img[8:16] == img[16:24]).mean() > 0.2


def test_resume_is_bit_exact(digits, tmp_path):
    from selfsup.data.prepared import Data, Split

    small = Data(Split(digits.train.x[:256], digits.train.y[:256]), digits.test, {**digits.meta, "n_train": 256})
    cfg = make_cfg(methods=["mae"], mae={**MAE_DIGITS, "epochs": 2}, log_every=1, checkpoint_minutes=0)
    assert_resume_is_exact(cfg, "mae", small, tmp_path, kill_after=0, kill_at_batch=1)

"""BEiT's and MAE's networks and recipes as their official code builds them (issue 25): BEiT's blocks (layer
scale, q / v biases, one shared relative position bias, no absolute position embedding), its init and the
1 / sqrt(2 l) rescaling, the saved trunk rebuilt by the evaluations and fine-tuning's per-block copies of
the bias; the official block-mask generator against a per-try reference; the tokeniser's Lanczos view
against PIL; MAE's xavier init; both methods' no-weight-decay sets against the official rules; the
fine-tuning cosine floor and its global batch in micro-batches."""
import math

import numpy as np
import pytest
import torch
from conftest import make_cfg

from selfsup.core.config import ConfigError
from selfsup.models.backbones import BEiTBlock, DropPath, PatchMap, RelPosBias, build_backbone, vit_trunk

BEIT = {"backbone": "vit_digits", "vocab": 16, "min_block": 4, "mask_ratio": 0.4}


def _beit(**over):
    from selfsup.methods.beit import BEiT, BEiTCfg

    cfg = BEiTCfg(**{**BEIT, **over})
    cfg.check("beit")
    return BEiT(build_backbone("vit_digits", 1, image_size=8), cfg, 10)


# ----------------------------------------------------------------- the BEiT transformer
def test_beit_blocks_layer_scale_shared_bias_and_no_absolute_position():
    torch.manual_seed(0)
    m = _beit()
    vit = vit_trunk(m.backbone)
    assert vit.vit.encoder.pos_embedding is None  # official use_abs_pos_emb False
    assert isinstance(vit.rel_pos_bias, RelPosBias)
    table = vit.rel_pos_bias.relative_position_bias_table
    assert table.shape == ((2 * 4 - 1) ** 2 + 3, 4) and float(table.detach().abs().max()) == 0.0  # zero at init
    for blk in vit.vit.encoder.layers:
        assert isinstance(blk, BEiTBlock) and blk.rel_pos_bias is None  # the one shared table
        assert torch.equal(blk.gamma_1, torch.full((64,), 0.1)) and torch.equal(blk.gamma_2, torch.full((64,), 0.1))
        assert float(blk.q_bias.abs().max()) == 0 and float(blk.v_bias.abs().max()) == 0 and blk.qkv.bias is None
    assert vit.options == {"blocks": "beit", "layer_scale": 0.1, "rel_pos_bias": "shared"}
    # none / 0: torchvision's blocks and learned absolute embedding (the earlier network)
    old = vit_trunk(_beit(rel_pos_bias="none", layer_scale_init=0.0).backbone)
    assert old.rel_pos_bias is None and old.vit.encoder.pos_embedding is not None and not old.options
    assert not any(isinstance(b, BEiTBlock) for b in old.vit.encoder.layers)
    with pytest.raises(ConfigError, match="beit.rel_pos_bias"):
        _beit(rel_pos_bias="per_layer")
    with pytest.raises(ConfigError, match="beit.mask_fill"):
        _beit(mask_fill="exact")


def test_beit_init_and_the_output_projection_rescale():
    """trunc-normal(0.02) cut at +-0.02 (modeling_pretrain.py's wrapper passes a = -std, b = std): every
    Linear and the patch projection; then attn.proj and mlp.fc2 of block l divided by sqrt(2 l)
    (fix_init_weight), nothing else touched."""
    torch.manual_seed(0)
    plain = _beit(init_rescale=False)
    torch.manual_seed(0)
    scaled = _beit()
    lp, ls = vit_trunk(plain.backbone).vit.encoder.layers, vit_trunk(scaled.backbone).vit.encoder.layers
    for i, (a, b) in enumerate(zip(lp, ls), start=1):
        torch.testing.assert_close(b.proj.weight, a.proj.weight / math.sqrt(2 * i), rtol=0, atol=0)
        torch.testing.assert_close(b.fc2.weight, a.fc2.weight / math.sqrt(2 * i), rtol=0, atol=0)
        assert torch.equal(a.fc1.weight, b.fc1.weight) and torch.equal(a.qkv.weight, b.qkv.weight)
    torch.manual_seed(0)
    big = build_backbone("vit_tiny", 3, image_size=32)  # enough weights for the statistics
    vb = vit_trunk(big)
    vb.use_beit_blocks(0.1, "shared")
    vb.init_beit(0.02)
    w = vb.vit.encoder.layers[0].fc1.weight.detach()
    # N(0, 0.02) cut at one sigma: std 0.02 x 0.5396 (the truncated standard normal's)
    assert float(w.abs().max()) <= 0.02 and abs(float(w.std()) - 0.02 * 0.5396) < 2e-4
    conv = vb.vit.conv_proj.weight.detach()
    assert float(conv.abs().max()) <= 0.02 and abs(float(conv.std()) - 0.02 * 0.5396) < 1e-3
    assert float(vb.vit.encoder.layers[0].proj.bias.abs().max()) == 0 and float(vb.vit.conv_proj.bias.abs().max()) == 0
    assert 0 < float(vb.vit.class_token.abs().max()) <= 0.02


def test_saved_beit_trunk_loads_for_the_evaluations_with_its_probe_points(digits, tmp_path):
    from selfsup.models.backbones import load_backbone, save_backbone

    torch.manual_seed(0)
    m = _beit()
    with torch.no_grad():
        vit_trunk(m.backbone).rel_pos_bias.relative_position_bias_table.normal_()
    m.eval()
    cfg = make_cfg(methods={"beit": "x"})
    save_backbone(tmp_path / "enc.pt", m, cfg, digits.meta)
    net = load_backbone(tmp_path / "enc.pt", torch.device("cpu"))
    assert vit_trunk(net).options["rel_pos_bias"] == "shared"
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x), m.backbone(x))
    seen = []
    for tap in vit_trunk(net).blocks:
        assert isinstance(tap, PatchMap)
        tap.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        net(x)
    assert seen == [(5, 64, 4, 4)] * 2  # block1, block2 as (B, D, h, w) maps
    with torch.no_grad():  # another grid (detection's sizes): the bias table resized, the tokens come out
        assert vit_trunk(net).feature_map(torch.randn(2, 1, 12, 10)).shape == (2, 64, 6, 5)


def test_finetuning_copies_the_shared_bias_into_each_block_at_its_layer():
    """unilm run_class_finetuning.py --rel_pos_bias: blocks.i.attn.relative_position_bias_table = the shared
    table, then trained apart; layer decay gives each copy its block's layer (get_num_layer_for_vit:
    blocks.i -> i + 1) and the copies are decayed (2-d, not in no_weight_decay)."""
    from selfsup.eval.finetune import param_groups_lrd

    torch.manual_seed(0)
    net = _beit().backbone.eval()
    vit = vit_trunk(net)
    with torch.no_grad():
        vit.rel_pos_bias.relative_position_bias_table.normal_()
    shared = vit.rel_pos_bias.relative_position_bias_table.detach().clone()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        before = net(x)
    vit.unshare_rel_pos_bias()
    assert vit.rel_pos_bias is None and vit.options["rel_pos_bias"] == "per_block"
    tables = [blk.rel_pos_bias.relative_position_bias_table for blk in vit.vit.encoder.layers]
    assert all(torch.equal(t, shared) for t in tables) and tables[0] is not tables[1]
    with torch.no_grad():
        torch.testing.assert_close(net(x), before)
    model = torch.nn.Module()
    model.backbone, model.fc = net, torch.nn.Linear(64, 10)
    groups = param_groups_lrd(model, 0.05, 0.5, 2)
    for i, t in enumerate(tables):
        g = next(g for g in groups if any(p is t for p in g["params"]))
        assert g["lr_scale"] == 0.5 ** (2 + 1 - (i + 1)) and g["weight_decay"] == 0.05


def _official_name(n):
    """Our parameter names -> the official modules' (modeling_pretrain.py) for the no-decay rule."""
    return {"backbone.trunk.vit.class_token": "cls_token", "backbone.trunk.vit.encoder.pos_embedding": "pos_embed",
            "mask_token": "mask_token"}.get(n, n)


def test_beit_no_weight_decay_set_is_the_official_one():
    """optim_factory.get_parameter_groups(model, wd, model.no_weight_decay()): no decay when 1-d, a .bias or
    in {pos_embed, cls_token}; the relative position bias table and the mask token decay."""
    for over in ({}, {"rel_pos_bias": "none", "layer_scale_init": 0.0}):
        m = _beit(**over)
        ours = {id(p) for g in m.param_groups() if g["weight_decay"] == 0.0 for p in g["params"]}
        ref = {id(p) for n, p in m.named_parameters() if p.requires_grad and (
            p.ndim == 1 or n.endswith(".bias") or _official_name(n) in {"pos_embed", "cls_token"})}
        assert ours == ref, over
        every = {id(p) for g in m.param_groups() for p in g["params"]}
        assert every == {id(p) for p in m.parameters() if p.requires_grad}
    m = _beit()
    table = vit_trunk(m.backbone).rel_pos_bias.relative_position_bias_table
    decayed = {id(p) for g in m.param_groups() if g["weight_decay"] > 0 for p in g["params"]}
    assert id(table) in decayed and id(m.mask_token) in decayed  # as officially


def test_beit_drop_path_reaches_the_own_blocks():
    m = _beit(drop_path=0.2)
    d = [blk.drop_path for blk in vit_trunk(m.backbone).vit.encoder.layers]
    assert all(isinstance(x, DropPath) for x in d) and d[0].p == 0.0 and abs(d[1].p - 0.2) < 1e-12


# ----------------------------------------------------------------- masks
def slow_official_mask(h, w, num, min_block, min_aspect, g):
    """masking_generator.py's MaskingGenerator.__call__ / _mask transcribed cell by cell, drawing from ``g``
    in the order the official code draws from Python's random (uniform area, uniform log aspect, randint
    top, randint left)."""
    mask = [[0] * w for _ in range(h)]
    count = 0
    lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
    while count < num:
        max_mask = num - count
        delta = 0
        for _attempt in range(10):
            area = min_block + (max_mask - min_block) * float(torch.rand((), generator=g))
            aspect = math.exp(lo + (hi - lo) * float(torch.rand((), generator=g)))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if bw < w and bh < h:
                top = int(torch.randint(0, h - bh + 1, (), generator=g))
                left = int(torch.randint(0, w - bw + 1, (), generator=g))
                masked = sum(mask[i][j] for i in range(top, top + bh) for j in range(left, left + bw))
                if 0 < bh * bw - masked <= max_mask:
                    for i in range(top, top + bh):
                        for j in range(left, left + bw):
                            if mask[i][j] == 0:
                                mask[i][j] = 1
                                delta += 1
                if delta > 0:
                    break
        if delta == 0:
            break
        count += delta
    return torch.tensor(mask, dtype=torch.bool)


@pytest.mark.parametrize("h,w,ratio,min_block", [(14, 14, 75 / 196, 16), (4, 4, 0.4, 4), (8, 8, 0.4, 4),
                                                 (6, 9, 0.5, 3)])
def test_official_mask_fill_equals_the_generator_try_for_try(h, w, ratio, min_block):
    from selfsup.augment.masking import block_mask

    num = int(round(ratio * h * w))
    for seed in range(30):
        ours = block_mask(h, w, ratio, torch.Generator().manual_seed(seed), min_block, 0.3, fill="official")
        ref = slow_official_mask(h, w, num, min_block, 0.3, torch.Generator().manual_seed(seed))
        assert torch.equal(ours, ref), (seed, int(ours.sum()), int(ref.sum()))


def test_official_fill_stops_short_and_complete_reaches_the_count():
    from selfsup.augment.masking import block_mask

    g = torch.Generator().manual_seed(0)
    off = [int(block_mask(14, 14, 75 / 196, g, 16, fill="official").sum()) for _ in range(300)]
    com = [int(block_mask(14, 14, 75 / 196, g, 16, fill="complete").sum()) for _ in range(300)]
    assert max(off) == 75 and 73.5 < np.mean(off) < 75 and min(off) < 75  # the official mean is about 74.5
    assert all(c == 75 for c in com)


# ----------------------------------------------------------------- the tokeniser's view
def test_lanczos_view_matches_pil():
    from PIL import Image

    from selfsup.models.tokenizer import lanczos_resize

    rng = np.random.default_rng(0)
    for (hh, ww, h, w) in [(48, 40, 24, 24), (16, 16, 32, 32), (25, 19, 10, 14)]:
        a = rng.random((hh, ww)).astype(np.float32)
        ref = np.asarray(Image.fromarray(a, mode="F").resize((w, h), Image.LANCZOS))
        ours = lanczos_resize(torch.from_numpy(a)[None, None].double(), (h, w))[0, 0].numpy()
        assert np.abs(ref - ours).max() < 1e-5


def test_beit_sets_the_dalle_view_and_bilinear_keeps_the_old_one():
    import torch.nn.functional as F

    from selfsup.models.tokenizer import DalleEncoder, DalleTokenizer, lanczos_resize, map_pixels

    torch.manual_seed(0)
    tok = DalleTokenizer(16, 1, [0.3], [0.4], DalleEncoder(n_hid=64, vocab_size=512)).eval()
    x = torch.randn(2, 1, 32, 32)
    pix = (x * 0.4 + 0.3)
    assert tok.resample == "lanczos"
    torch.testing.assert_close(tok.pixels(x), map_pixels(lanczos_resize(pix, (16, 16)).clamp(0, 1)).expand(-1, 3, -1, -1))
    tok.resample = "bilinear"
    old = F.interpolate(pix, size=(16, 16), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    torch.testing.assert_close(tok.pixels(x), map_pixels(old).expand(-1, 3, -1, -1))


# ----------------------------------------------------------------- MAE
def _mae(**over):
    from selfsup.methods.mae import MAE, MAECfg

    cfg = MAECfg(**{"backbone": "vit_digits", "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 4,
                    "decoder_mlp": 64, **over})
    cfg.check("mae")
    return MAE(build_backbone(cfg.backbone, 1 if cfg.backbone == "vit_digits" else 3, image_size=8 if
                              cfg.backbone == "vit_digits" else 32), cfg, 10)


def test_mae_official_init():
    """models_mae.py initialize_weights: xavier-uniform Linears (timm's fused qkv as one (3 D, D) matrix),
    the patch projection as a Linear on its flattened weight, zero biases, CLS and mask tokens N(0, 0.02)."""
    torch.manual_seed(0)
    m = _mae(backbone="vit_small")
    v = vit_trunk(m.backbone).vit
    att = v.encoder.layers[0].self_attention
    d = 384
    for w, fan_in, fan_out in [(att.in_proj_weight, d, 3 * d), (att.out_proj.weight, d, d),
                               (v.encoder.layers[0].mlp[0].weight, d, 4 * d),
                               (v.conv_proj.weight, 3 * 16 * 16, d), (m.decoder_pred.weight, 32, 16 * 16 * 3),
                               (m.decoder_blocks[0].self_attention.in_proj_weight, 32, 96)]:
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.97 * bound, w.shape
    assert float(att.in_proj_bias.abs().max()) == 0 and float(v.encoder.layers[0].mlp[0].bias.abs().max()) == 0
    assert abs(float(v.class_token.std()) - 0.02) < 0.004 and abs(float(m.mask_token.std()) - 0.02) < 0.01
    old = _mae(backbone="vit_small", init="torchvision")  # torchvision's init: biases N(0, 1e-6), not 0
    assert float(vit_trunk(old.backbone).vit.encoder.layers[0].mlp[0].bias.abs().max()) > 0


def test_mae_no_weight_decay_set_is_the_official_one():
    """main_pretrain.py: optim_factory.add_weight_decay(model, wd) (timm 0.3.2, empty skip list): no decay on
    1-d tensors and .bias only; the CLS and mask tokens decay; the fixed sin-cos tables are not trained."""
    m = _mae()
    ours = {id(p) for g in m.param_groups() if g["weight_decay"] == 0.0 for p in g["params"]}
    dec = {id(p) for g in m.param_groups() if g["weight_decay"] > 0 for p in g["params"]}
    ref_no = {id(p) for n, p in m.named_parameters() if p.requires_grad and (p.ndim == 1 or n.endswith(".bias"))}
    ref_dec = {id(p) for n, p in m.named_parameters() if p.requires_grad} - ref_no
    assert ours == ref_no and dec == ref_dec
    assert id(m.mask_token) in dec and id(vit_trunk(m.backbone).vit.class_token) in dec


# ----------------------------------------------------------------- fine-tuning
def test_finetune_cosine_ends_at_min_lr():
    """MAE lr_sched.adjust_learning_rate: warm-up lr x t / warm, then min_lr + (lr - min_lr)(1 + cos) / 2."""
    from selfsup.eval.finetune import finetune_lr

    peak, warm, total, floor = 4e-3, 10, 110, 1e-6
    assert finetune_lr(0, peak, warm, total, floor) == 0.0 and finetune_lr(5, peak, warm, total, floor) == peak / 2
    assert finetune_lr(10, peak, warm, total, floor) == pytest.approx(peak)
    assert finetune_lr(60, peak, warm, total, floor) == pytest.approx(floor + (peak - floor) * 0.5)
    assert finetune_lr(110, peak, warm, total, floor) == pytest.approx(floor)


def test_finetune_global_batch_in_micro_batches(digits, monkeypatch):
    """batch_size is the batch of one optimiser step; micro_batch splits it for memory: the same number of
    optimiser steps, each over micro-batches of that size, the lr scaled by the global batch."""
    from selfsup.eval import finetune as ft
    from selfsup.data.prepared import Data, Split

    calls = []
    real = ft.accumulated_step

    def spy(forward, opt, micro, *a, **k):
        calls.append([len(x) for x, _ in micro])
        return real(forward, opt, micro, *a, **k)

    monkeypatch.setattr(ft, "accumulated_step", spy)
    small = Data(Split(np.asarray(digits.train.x[:200]), digits.train.y[:200]), digits.test, digits.meta)
    cfg = make_cfg(methods=["random"], finetune={"epochs": 1, "warmup_epochs": 0, "batch_size": 64, "micro_batch": 16,
                                                 "mixup": 0.8, "cutmix": 1.0, "flip": False})
    out = ft.finetune(build_backbone("vit_digits", 1, image_size=8), small, cfg, torch.device("cpu"), 0)
    assert calls == [[16, 16, 16, 16]] * 3 + [[8]] and "micro-batches of 16 (B = 64)" in out["protocol"]
    with pytest.raises(ConfigError, match="finetune.micro_batch"):
        make_cfg(finetune={"micro_batch": -1})

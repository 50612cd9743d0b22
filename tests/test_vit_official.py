"""The ViT options the official pre-training codes use (issue 25): the fixed 2-D sin-cos position
embedding of MoCo v3 (moco-v3 ``vits.py``) and MAE (mae ``util/pos_embed.py``), MoCo v3's init, and
BEiT's stochastic depth in pre-training (unilm ``beit/run_beit_pretraining.py`` ``--drop_path 0.1``)."""
import math

import torch
from conftest import make_cfg

from selfsup.methods import Batch
from selfsup.models.backbones import DropPath, build_backbone, sincos_pos_embed, vit_trunk


def _slow(dim, h, w, r, c, k, first):
    """Entry k of patch (row r, column c) of an h x w grid, written from the formula: channel block q of
    [sin(a), cos(a), sin(b), cos(b)] (each dim / 4 wide) at frequency 1 / 10000^(i / (dim / 4)); a is
    the column for MAE ("w" first), the row for MoCo v3 ("h" first)."""
    q, i = divmod(k, dim // 4)
    a, b = (c, r) if first == "w" else (r, c)
    pos = a if q < 2 else b
    ang = pos / 10000 ** (i / (dim / 4))
    return math.sin(ang) if q % 2 == 0 else math.cos(ang)


def test_sincos_tables_match_the_formula_for_mae_and_mocov3():
    dim, h, w = 16, 3, 5
    for first in ("w", "h"):
        t = sincos_pos_embed(dim, h, w, first=first)  # (1 + h w, dim)
        assert t.shape == (1 + h * w, dim) and torch.equal(t[0], torch.zeros(dim))  # CLS row 0
        for r, c, k in [(0, 0, 1), (1, 2, 0), (2, 4, 3), (1, 3, 5), (2, 1, 9), (0, 4, 14), (2, 3, 15)]:
            want = _slow(dim, h, w, r, c, k, first)
            assert abs(float(t[1 + r * w + c, k]) - want) < 1e-6, (first, r, c, k)
    # MoCo v3's table on a square grid is MAE's with the two halves swapped
    a, b = sincos_pos_embed(dim, 4, 4, first="w"), sincos_pos_embed(dim, 4, 4, first="h")
    assert torch.equal(a[:, :dim // 2], b[:, dim // 2:]) and torch.equal(a[:, dim // 2:], b[:, :dim // 2])


def _pe(m):
    return vit_trunk(m.backbone).vit.encoder.pos_embedding


def _step(m, batch):
    from selfsup.engine.optim import build_optimizer

    opt = build_optimizer(m.param_groups(), m.cfg)
    m.train()
    m(batch).loss.backward()
    opt.step()
    return opt


def test_frozen_sincos_pos_embed_gets_no_gradient_and_no_decay_in_mocov3_and_mae(digits):
    from selfsup.engine.loop import build_method

    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(8, 1, 8, 8, generator=g), torch.randn(8, 1, 8, 8, generator=g)
    y, idx = torch.zeros(8, dtype=torch.long), torch.arange(8)
    for name, order, over, batch in [
        ("mocov3", "h", {"dim": 16, "mlp_dim": 32}, Batch([x1, x2], y, idx)),
        ("mae", "w", {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2, "decoder_mlp": 32},
         Batch([x1], y, idx)),
    ]:
        cfg = make_cfg(methods=[name], **{name: {"backbone": "vit_digits", "lr": 0.1, "weight_decay": 0.5, **over}})
        m = build_method(cfg, name, digits)
        pe = _pe(m)
        assert not pe.requires_grad
        assert torch.equal(pe[0], sincos_pos_embed(64, 4, 4, first=order)), name
        before = pe.detach().clone()
        opt = _step(m, batch)
        assert pe.grad is None, name
        assert all(p is not pe for grp in opt.param_groups for p in grp["params"]), name  # in no group
        assert torch.equal(pe, before), name  # neither trained nor decayed
        if name == "mocov3":  # the momentum encoder's copy is the same fixed table
            assert torch.equal(vit_trunk(m.momentum_backbone).vit.encoder.pos_embedding, before)
        # learned: torchvision's trainable embedding, in the optimiser
        cfg = make_cfg(methods=[name], **{name: {"backbone": "vit_digits", "pos_embed": "learned", **over}})
        m = build_method(cfg, name, digits)
        assert _pe(m).requires_grad and not torch.equal(_pe(m)[0], sincos_pos_embed(64, 4, 4, first=order))


def test_mocov3_official_init_statistics():
    torch.manual_seed(0)
    net = build_backbone("vit_small", 3, image_size=64)
    v = vit_trunk(net)
    v.init_mocov3()
    d = 384
    att = v.vit.encoder.layers[0].self_attention
    w = att.in_proj_weight.detach()  # (3 D, D)
    bound = math.sqrt(6.0 / (d + d))  # one D x D matrix's xavier bound, not the fused (3 D, D) one's
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.02 * bound  # uniform: std = bound / sqrt(3)
    assert float(att.in_proj_bias.abs().max()) == 0.0
    fc1 = v.vit.encoder.layers[0].mlp[0]  # (1536, 384): xavier over the whole matrix
    xb = math.sqrt(6.0 / (384 + 1536))
    assert fc1.weight.abs().max() <= xb and fc1.weight.abs().max() > 0.99 * xb and float(fc1.bias.abs().max()) == 0
    out = att.out_proj.weight
    assert out.abs().max() <= bound and out.abs().max() > 0.99 * bound
    cls = v.vit.class_token
    assert 0 < float(cls.std()) < 2e-6 and float(cls.abs().max()) < 1e-5
    conv = v.vit.conv_proj  # (D, 3, 16, 16): xavier on the flattened (D, 3 16 16) weight
    cb = math.sqrt(6.0 / (3 * 16 * 16 + d))
    assert conv.weight.abs().max() <= cb and conv.weight.abs().max() > 0.99 * cb and float(conv.bias.abs().max()) == 0


def test_mocov3_init_and_pos_embed_keys_leave_conv_nets_and_other_methods_alone(digits):
    from selfsup.engine.loop import build_method

    torch.manual_seed(0)
    plain = build_backbone("vit_digits", 1, image_size=8).state_dict()
    torch.manual_seed(0)
    again = build_backbone("vit_digits", 1, image_size=8).state_dict()
    assert all(torch.equal(plain[k], again[k]) for k in plain)  # building is unchanged by the options
    torch.manual_seed(0)
    cfg = make_cfg(methods=["mocov3"], mocov3={"backbone": "vit_digits", "dim": 16, "mlp_dim": 32,
                                               "init": "torchvision", "pos_embed": "learned"})
    m = build_method(cfg, "mocov3", digits)
    assert _pe(m).requires_grad and vit_trunk(m.backbone).vit.class_token.abs().max() == 0  # torchvision's zeros
    cfg = make_cfg(methods=["mocov3"], mocov3={"backbone": "smallcnn", "dim": 16, "mlp_dim": 32,
                                               "freeze_patch_embed": False})
    build_method(cfg, "mocov3", digits)  # a conv net: the ViT-only keys are ignored


def test_beit_drop_path_is_active_in_train_mode_only(digits):
    from selfsup.methods.beit import BEiT, BEiTCfg

    cfg = BEiTCfg(backbone="vit_digits", vocab=16, min_block=2)
    cfg.check("beit")
    torch.manual_seed(0)
    m = BEiT(build_backbone("vit_digits", 1, image_size=8), cfg, 10)
    layers = vit_trunk(m.backbone).vit.encoder.layers
    drops = [blk.drop_path for blk in layers]  # BEiT's blocks (selfsup.models.backbones.BEiTBlock)
    assert all(isinstance(d, DropPath) for d in drops)
    assert drops[0].p == 0.0 and abs(drops[-1].p - 0.1) < 1e-12  # linear over the blocks to 0.1
    x = torch.randn(16, 1, 8, 8)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    m.eval()
    with torch.no_grad():
        a, b = m.encode_masked(x, mask), m.encode_masked(x, mask)
    assert torch.equal(a, b)  # eval: deterministic
    m.train()
    torch.manual_seed(1)
    with torch.no_grad():
        c, d = m.encode_masked(x, mask), m.encode_masked(x, mask)
    assert not torch.equal(c, d)  # train: whole residual branches dropped per sample
    off = BEiT(build_backbone("vit_digits", 1, image_size=8), BEiTCfg(backbone="vit_digits", vocab=16,
                                                                      drop_path=0.0), 10)
    assert not any(isinstance(mod, DropPath) for mod in off.modules())  # 0: the blocks as built

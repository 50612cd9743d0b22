"""Vision Transformer backbones (selfsup.models.backbones.ViT on torchvision's VisionTransformer): the DINO / MoCo v3
sizes, the CLS-token output for 1- and 3-channel input, any input size through the resized position
embedding, the blocks as probe points, an exact save / load round trip (the file records the arch and
the image side), the frozen random patch projection (MoCo v3 sec. 4.2), and a method's own backbone
(``<method>.backbone``) beside model.backbone."""
from types import SimpleNamespace

import pytest
import torch
from conftest import make_cfg

from selfsup.core.config import ConfigError
from selfsup.models.backbones import (
    VITS,
    ViT,
    build_backbone,
    load_backbone,
    save_backbone,
    vit_trunk,
)

CPU = torch.device("cpu")
# a small DINO on vit_digits (epochs 1: no warm-up)
DINO = {"backbone": "vit_digits", "epochs": 1, "warmup_epochs": 0, "warmup_teacher_temp_epochs": 0, "out_dim": 64,
        "hidden_dim": 32, "bottleneck_dim": 16}


@pytest.mark.parametrize("name, dim, depth, heads, mlp, patch", [
    ("vit_tiny", 192, 12, 3, 768, 16),
    ("vit_small", 384, 12, 6, 1536, 16),
    ("vit_base", 768, 12, 12, 3072, 16),
    ("vit_digits", 64, 2, 4, 128, 2),
])
def test_vits_build_with_the_papers_sizes_and_give_the_cls_token(name, dim, depth, heads, mlp, patch):
    size = 32 if patch == 16 else 8  # a 2 x 2 / 4 x 4 patch grid keeps the test cheap
    for ch in (1, 3):
        torch.manual_seed(0)
        net = build_backbone(name, ch, image_size=size).eval()
        v = vit_trunk(net)
        assert isinstance(v, ViT) and net.out_dim == dim and net.in_channels == ch and not net.relu_head
        layers = list(v.vit.encoder.layers)
        assert len(layers) == depth and v.patch == patch
        assert layers[0].self_attention.num_heads == heads and layers[0].mlp[0].out_features == mlp
        assert v.vit.conv_proj.in_channels == ch and v.vit.conv_proj.kernel_size == (patch, patch)
        assert not any(isinstance(m, torch.nn.Linear) and m.out_features == 1000 for m in net.modules())  # no classifier
        with torch.no_grad():
            out = net(torch.randn(2, ch, size, size))
        assert out.shape == (2, dim) and torch.isfinite(out).all()


def test_the_output_is_torchvisions_cls_token_after_the_final_layernorm():
    """At the size it was built for, the forward (with probe points and the resized position
    embedding code path unused) is torchvision's VisionTransformer.forward without its head."""
    torch.manual_seed(0)
    net = build_backbone("vit_tiny", 3, image_size=32).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), net.trunk.vit(x), atol=1e-6)  # heads = Identity: the CLS token after ln


def test_other_input_sizes_take_the_resized_position_embedding():
    torch.manual_seed(0)
    net = build_backbone("vit_digits", 1, image_size=8).eval()
    v = vit_trunk(net)
    assert v.grid == 4 and v.image_size == 8
    with torch.no_grad():
        for h, w in [(4, 4), (6, 6), (8, 12), (16, 16)]:  # multi-crop's local crops, other eval sizes
            assert net(torch.randn(2, 1, h, w)).shape == (2, 64)
        pe = v.pos_embed(4, 4)
        assert pe is v.vit.encoder.pos_embedding  # the built grid: unchanged
        big = v.pos_embed(8, 8)  # bicubic resize of the 4 x 4 grid, the CLS position kept
        assert big.shape == (1, 65, 64) and torch.equal(big[:, 0], pe[:, 0])
    with pytest.raises(ValueError, match="vit_small needs images of at least 16"):
        build_backbone("vit_small", 3, image_size=8)


def test_blocks_are_the_probe_points():
    from selfsup.models.backbones import probe_points

    torch.manual_seed(0)
    net = build_backbone("vit_digits", 1, image_size=8).eval()
    points = probe_points(net)
    assert list(points) == ["block1", "block2"]
    shapes = {}
    for name, m in points.items():
        m.register_forward_hook(lambda mod, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
    with torch.no_grad():
        net(torch.randn(5, 1, 8, 8))
    assert shapes == {"block1": (5, 64, 4, 4), "block2": (5, 64, 4, 4)}  # patch tokens as a map


def test_probe_features_of_a_vit(digits):
    from selfsup.eval.layer_probes import layer_features

    torch.manual_seed(0)
    net = build_backbone("vit_digits", 1, image_size=8)
    f = layer_features(net, digits.test, digits.meta, CPU, ["block2"], target_dim=256)["block2"]
    assert f.shape == (len(digits.test), 64 * 2 * 2)  # pooled to 2 x 2: 64 x 4 ~ 256 dims


def test_save_load_round_trip_is_exact_and_records_the_arch(digits, tmp_path):
    """A method on its own ViT (dino.backbone: vit_digits, model.backbone smallcnn): the file records
    vit_digits and the image side; the loaded network gives the saved encoder's features exactly, at
    the eval geometry of the extract stage."""
    from selfsup.models.features import extract_features
    from selfsup.engine.loop import build_method

    cfg = make_cfg(methods=["dino"], dino=DINO)
    assert cfg.model.backbone == "smallcnn"
    m = build_method(cfg, "dino", digits)
    with torch.no_grad():  # make the saved (teacher) encoder differ from a fresh init
        for p in m.encoder().parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_backbone(tmp_path / "m.pt", m, cfg, digits.meta)
    arch = torch.load(tmp_path / "m.pt", weights_only=False)["arch"]
    assert arch["name"] == "vit_digits" and arch["image_size"] == 8 and arch["in_channels"] == 1
    net = load_backbone(tmp_path / "m.pt", CPU)
    assert isinstance(vit_trunk(net), ViT)
    ref = extract_features(m.encoder().eval(), digits.test, digits.meta, CPU)
    got = extract_features(net, digits.test, digits.meta, CPU)
    assert got.shape == (len(digits.test), 64) and (got == ref).all()


def test_save_load_keeps_a_non_default_image_side(tmp_path):
    torch.manual_seed(0)
    net = build_backbone("vit_tiny", 3, image_size=48).eval()  # 3 x 3 grid, not the default 224's 14 x 14
    method = SimpleNamespace(encoder=lambda: net, eval_head=lambda: None, cfg=SimpleNamespace(), name="x")
    cfg = SimpleNamespace(model=SimpleNamespace(backbone="smallcnn"))
    save_backbone(tmp_path / "t.pt", method, cfg, {"channels": 3})
    back = load_backbone(tmp_path / "t.pt", CPU)
    assert vit_trunk(back).grid == 3 and back.trunk.vit.encoder.pos_embedding.shape == (1, 10, 192)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(back(x), net(x))


def test_frozen_patch_projection_stays_fixed_under_the_optimiser(digits):
    """MoCo v3's random patch projection: not among the optimised parameters, unchanged by a step
    (weight decay included), while the rest moves."""
    from selfsup.methods import Batch
    from selfsup.engine.optim import build_optimizer
    from selfsup.engine.loop import build_method

    cfg = make_cfg(methods=["mocov3"], mocov3={"backbone": "vit_digits", "dim": 16, "mlp_dim": 32, "lr": 0.1,
                                               "weight_decay": 0.1, "freeze_patch_embed": True})
    m = build_method(cfg, "mocov3", digits)
    proj = vit_trunk(m.backbone).patch_embed
    assert not any(p.requires_grad for p in proj.parameters())
    opt = build_optimizer(m.param_groups(), m.cfg)
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in proj.parameters()}
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(16, 1, 8, 8, generator=g), torch.randn(16, 1, 8, 8, generator=g)
    m(Batch([x1, x2], torch.zeros(16, dtype=torch.long), torch.arange(16))).loss.backward()
    opt.step()
    after = m.backbone.state_dict()
    for k in ("trunk.vit.conv_proj.weight", "trunk.vit.conv_proj.bias"):
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["trunk.vit.encoder.layers.encoder_layer_0.mlp.0.weight"],
                           after["trunk.vit.encoder.layers.encoder_layer_0.mlp.0.weight"])  # the rest trains
    # trainable when asked (DINO's default) and rejected on a conv net
    free = build_method(make_cfg(methods=["mocov3"], mocov3={"backbone": "vit_digits", "freeze_patch_embed": False,
                                                             "dim": 16, "mlp_dim": 32}), "mocov3", digits)
    assert all(p.requires_grad for p in vit_trunk(free.backbone).patch_embed.parameters())
    with pytest.raises(ConfigError, match="mocov3.freeze_patch_embed"):
        build_method(make_cfg(methods=["mocov3"], mocov3={"dim": 16, "mlp_dim": 32}), "mocov3", digits)


def test_a_method_has_its_own_backbone(digits):
    from selfsup.models.backbones import SmallCNN
    from selfsup.engine.loop import build_method

    cfg = make_cfg(methods=["dino", "simclr"], dino=DINO)
    assert cfg.method("simclr").backbone == ""  # "": model.backbone
    assert isinstance(build_method(cfg, "dino", digits).backbone.trunk, ViT)
    assert isinstance(build_method(cfg, "simclr", digits).backbone.trunk, SmallCNN)
    with pytest.raises(ConfigError, match=r"^dino\.backbone: unknown value 'vit_huge'"):
        make_cfg(methods=["dino"], dino={"backbone": "vit_huge"})
    with pytest.raises(ConfigError, match=r"^simclr\.backbone"):
        make_cfg(methods=["simclr"], simclr={"backbone": "resnet9000"})
    # the image side is checked against the method's own backbone, naming its key
    tiny = make_cfg(methods=["simclr"], simclr={"backbone": "vit_small"})
    with pytest.raises(ConfigError, match=r"^simclr\.backbone: vit_small needs images of at least 16 px, got 8"):
        build_method(tiny, "simclr", digits)
    assert set(VITS) <= set(__import__("selfsup.models.config", fromlist=["BACKBONES"]).BACKBONES)


def test_vit_feature_map_for_detection():
    """The detector's ViT backbone (selfsup.detection.detector.ViTMap): a stride-patch map of the patch tokens, at any
    image size (the position embedding resized); tests/test_voc.py trains a detector step on it."""
    net = build_backbone("vit_digits", 1, image_size=8)
    with torch.no_grad():
        assert net.trunk.feature_map(torch.randn(2, 1, 48, 64)).shape == (2, 64, 24, 32)


def test_sync_batch_norm_keeps_a_frozen_bn_frozen():
    """The CPU converter (GlobalBatchNorm) carries requires_grad over: an EMA target's or teacher's BN
    stays out of the gradient (else DDP waits for gradients that never come)."""
    from selfsup.core.dist import sync_batch_norm

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4))
    for p in net[1].parameters():
        p.requires_grad_(False)
    out = sync_batch_norm(net, torch.device("cpu"))
    assert [p.requires_grad for p in out[1].parameters()] == [False, False]
    assert [p.requires_grad for p in out[2].parameters()] == [True, True]


def test_drop_path_drops_whole_samples_and_is_off_in_eval():
    """Stochastic depth (timm's DropPath, DeiT / MAE / BEiT): in training each sample's branch is kept
    whole (scaled by 1 / (1 - p)) or zeroed; eval mode and p 0 are the identity; set_drop_path rises
    linearly over the blocks, keeps the blocks' dropout, and adds no parameter (a saved trunk loads)."""
    import torch

    from selfsup.models.backbones import DropPath, ViT

    torch.manual_seed(0)
    x = torch.randn(400, 3, 5)
    d = DropPath(0.25).train()
    y = d(x)
    kept = (y != 0).flatten(1).all(1)
    assert torch.equal(y[kept], x[kept] / 0.75) and not y[~kept].any()
    assert 0.6 < kept.float().mean() < 0.9
    assert torch.equal(d.eval()(x), x) and torch.equal(DropPath(0.0).train()(x), x)
    vit = ViT(1, 2, 16, 3, 2, 32, 8)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    img = torch.randn(4, 1, 8, 8)
    ref = vit.eval()(img)
    vit.set_drop_path(0.2)
    rates = [(b.dropout.p, b.mlp[4].p) for b in vit.vit.encoder.layers]
    assert rates == [(0.0, 0.0), (0.1, 0.1), (0.2, 0.2)]
    assert torch.equal(vit.eval()(img), ref) and vit.state_dict().keys() == before.keys()
    vit.set_drop_path(0.0)
    assert torch.equal(vit.train()(img), ref)  # no dropout in these blocks, no drop path: the same

"""The fine-tuning evaluation (selfsup/eval/finetune.py): layer-wise lr decay of a ViT as MAE's
param_groups_lrd, soft targets of label smoothing / mixup / CutMix, bad keys named, and a short run on
digits that learns (and leaves the pretrained encoder file untouched)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_cfg
from selfsup.core.config import ConfigError
from selfsup.eval.finetune import finetune, mix_batch, param_groups_lrd, vit_layer_id
from selfsup.models.backbones import build_backbone


def test_layer_decay_follows_the_block_depth():
    """Embeddings get decay^(L+1), block i decay^(L-i), the final norm and the classifier 1; biases,
    norms, the CLS token and the position embedding have no weight decay."""
    bb = build_backbone("vit_digits", 1, image_size=8)
    depth = len(bb.trunk.vit.encoder.layers)
    model = nn.Module()
    model.backbone, model.fc = bb, nn.Linear(bb.out_dim, 10)
    groups = param_groups_lrd(model, 0.05, 0.5, depth)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        layer = vit_layer_id(name, depth)
        if ".conv_proj." in name or name.endswith((".class_token", ".pos_embedding")):
            assert layer == 0, name
        elif ".encoder_layer_" in name:
            assert 1 <= layer <= depth, name
        else:
            assert layer == depth + 1, name  # the final LayerNorm and the classifier
        assert scale[id(p)] == pytest.approx(0.5 ** (depth + 1 - layer)), name
        no_wd = p.ndim <= 1 or name.endswith((".class_token", ".pos_embedding"))
        assert wd[id(p)] == (0.0 if no_wd else 0.05), name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # a conv net: one lr for every layer
    cnn = nn.Module()
    cnn.backbone, cnn.fc = build_backbone("smallcnn", 1), nn.Linear(128, 10)
    assert {g["lr_scale"] for g in param_groups_lrd(cnn, 0.05, 0.5, None)} == {1.0}


def _cfg(**over):
    return make_cfg(methods=["random"], finetune={"epochs": 2, "warmup_epochs": 0, **over}).finetune


def test_soft_targets_smoothing_mixup_cutmix():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    xs, t = mix_batch(x, y, 10, _cfg(label_smoothing=0.0, mixup=0.0, cutmix=0.0), g)
    assert torch.equal(xs, x) and torch.equal(t, nn.functional.one_hot(y, 10).float())
    xs, t = mix_batch(x, y, 10, _cfg(label_smoothing=0.1, mixup=0.0, cutmix=0.0), g)
    assert t.sum(1).allclose(torch.ones(6)) and t[0, 0] == pytest.approx(0.9 + 0.01) and t[0, 1] == pytest.approx(0.01)
    xs, t = mix_batch(x, y, 10, _cfg(label_smoothing=0.0, mixup=0.8, cutmix=0.0), g)
    lam = float(t[0, 0])  # sample 0 mixed with the last (the batch reversed)
    assert 0 < lam < 1 and t[0, 5] == pytest.approx(1 - lam)
    assert torch.allclose(xs, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    xs, t = mix_batch(x, y, 10, _cfg(label_smoothing=0.0, mixup=0.0, cutmix=1.0), g)
    pasted = (xs != x).float().mean().item()  # the box's share of the pixels (the pairs differ everywhere)
    assert float(t[0, 5]) == pytest.approx(pasted, abs=1e-6) and t.sum(1).allclose(torch.ones(6))


@pytest.mark.parametrize("key,value", [("layer_decay", 0.0), ("label_smoothing", 1.5), ("optimizer", "lamb"),
                                       ("warmup_epochs", 3)])
def test_bad_keys_are_named(key, value):
    with pytest.raises(ConfigError, match=f"finetune.{key}"):
        _cfg(**{key: value})


def test_a_short_finetune_learns_and_leaves_the_encoder_file(digits, tmp_path):
    from selfsup.models.backbones import load_backbone, save_backbone
    from selfsup.engine.loop import build_method

    cfg = make_cfg(methods=["random"], finetune={"epochs": 2, "warmup_epochs": 0, "batch_size": 64, "lr": 4e-3,
                                                 "mixup": 0.0, "cutmix": 0.0, "flip": False})
    m = build_method(cfg, "random", digits)
    save_backbone(tmp_path / "m.pt", m, cfg, digits.meta)
    before = (tmp_path / "m.pt").read_bytes()
    out = finetune(load_backbone(tmp_path / "m.pt", torch.device("cpu")), digits, cfg, torch.device("cpu"), 0)
    assert out["top1"] > 50 and math.isfinite(out["final_loss"]) and "fine-tuning" in out["protocol"]
    assert (tmp_path / "m.pt").read_bytes() == before
    again = finetune(load_backbone(tmp_path / "m.pt", torch.device("cpu")), digits, cfg, torch.device("cpu"), 0)
    assert again["top1"] == out["top1"] and np.isclose(again["final_loss"], out["final_loss"])  # seeded


def test_hidden_layers_are_the_first_part_of_the_projection_head():
    """SimCLR v2's fine-tuning from the projection head's first layer: the kept part computes exactly the
    head's first hidden layer, as a copy; asking for more layers than the head has is an error."""
    from selfsup.models.heads import hidden_layers, projection_head

    torch.manual_seed(0)
    proj = projection_head("mlp", 16, 8, hidden_dim=12, bn=True, layers=3).eval()
    one, width = hidden_layers(proj, 1)
    two, width2 = hidden_layers(proj, 2)
    x = torch.randn(5, 16)
    assert width == 12 and width2 == 12 and len(one) == 3 and len(two) == 6
    assert torch.equal(one.eval()(x), proj[:3](x)) and torch.equal(two.eval()(x), proj[:6](x))
    assert one[0].weight is not proj[0].weight  # fine-tuning it leaves the saved head alone
    with pytest.raises(ValueError, match="2 hidden layers, asked for 3"):
        hidden_layers(proj, 3)


def test_finetune_from_the_first_head_layer_of_simclr_v2(digits, digits_folder, tmp_path):
    """finetune.head_layers.simclr 1: the evaluate stage's fine-tuning step trains backbone + the first
    hidden layer of the saved 3-layer head + a classifier on its output (the protocol says so); a method
    whose file holds no projection head is named in the error."""
    from selfsup.eval.evaluate_all import finetune_step
    from selfsup.models.backbones import save_backbone
    from selfsup.core.stage import Paths
    from selfsup.engine.loop import build_method

    P = Paths(tmp_path)
    ft = {"enabled": True, "epochs": 1, "warmup_epochs": 0, "batch_size": 64, "lr": 4e-3, "mixup": 0.0,
          "cutmix": 0.0}
    cfg = make_cfg(methods=["simclr", "random"], simclr={"head_layers": 3, "hidden_dim": 32},
                   finetune={**ft, "head_layers": {"simclr": 1}})
    (P.dataset.parent).mkdir(parents=True, exist_ok=True)
    P.dataset.symlink_to(digits_folder)
    for m in ("simclr", "random"):
        save_backbone(P.model(m), build_method(cfg, m, digits), cfg, digits.meta)
    out = finetune_step(cfg, "simclr", P, digits.train.y, digits.test.y, torch.device("cpu"))
    assert "from hidden layer 1 of the projection head" in out["protocol"] and out["top1"] > 20
    bad = make_cfg(methods=["simclr", "random"], finetune={**ft, "head_layers": {"random": 1}})
    with pytest.raises(ConfigError, match="finetune.head_layers.random"):
        finetune_step(bad, "random", P, digits.train.y, digits.test.y, torch.device("cpu"))
    with pytest.raises(ConfigError, match="finetune.head_layers.moco: 'moco' is not in methods"):
        make_cfg(methods=["simclr"], finetune={"head_layers": {"moco": 1}})


# --------------------------------------------------------------------------- the papers' recipe keys
def _vit_model(seed=0, depth=2):
    """A small ViT (LayerNorm only, no dropout: the batch split changes nothing) + a classifier."""
    from selfsup.models.backbones import Backbone, ViT

    torch.manual_seed(seed)
    trunk = ViT(1, 2, 16, depth, 2, 32, 8)
    model = nn.Module()
    model.backbone = Backbone(trunk, 16, None, False, name="vit_test", image_size=8)
    model.fc = nn.Linear(16, 10)
    return model


def _soft(y, k=10):
    return nn.functional.one_hot(y, k).float()


@pytest.mark.parametrize("sizes", [(4, 4), (3, 5)])
def test_accumulated_micro_batches_step_as_one_batch(sizes):
    """micro_batch: micro-batches of b_i images give the gradients and the SGD update of one batch of
    sum b_i (MAE's accum_iter; unequal sizes weighted by their share), not those of the first micro-batch."""
    from selfsup.eval.finetune import accumulated_step
    from selfsup.engine.optim import build_optimizer

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    c = _cfg(optimizer="sgd", weight_decay=0.05)
    cpu = torch.device("cpu")
    runs = []
    for micro in ([(x[:sizes[0]], _soft(y[:sizes[0]])), (x[sizes[0]:], _soft(y[sizes[0]:]))], [(x, _soft(y))]):
        model = _vit_model()
        opt = build_optimizer(param_groups_lrd(model, c.weight_decay, 1.0, 2), c)
        fwd = lambda v, m=model: m.fc(m.backbone(v))  # noqa: E731
        accumulated_step(fwd, opt, micro, cpu, "fp32")
        runs.append(({n: p.grad.clone() for n, p in model.named_parameters()},
                     {n: p.detach().clone() for n, p in model.named_parameters()}))
    (ga, pa), (gb, pb) = runs
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-6, rtol=1e-5, msg=n)
        torch.testing.assert_close(pa[n], pb[n], atol=1e-6, rtol=1e-5, msg=n)
    first = _vit_model()
    nn.functional.cross_entropy(first.fc(first.backbone(x[:sizes[0]])), y[:sizes[0]]).backward()
    assert not torch.allclose(first.fc.weight.grad, ga["fc.weight"], atol=1e-4)  # the check can tell them apart


def test_bf16_autocast_forward_and_fp32_left_alone():
    """precision bf16: the forward runs under autocast (bf16 logits before the cast), the gradients stay
    fp32 and close to fp32's; fp32 is a plain forward."""
    from selfsup.eval.finetune import accumulated_step

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)
    grads, seen = {}, {}
    for precision in ("fp32", "bf16"):
        model = _vit_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)

        def fwd(v, m=model, p=precision):
            out = m.fc(m.backbone(v))
            seen[p] = out.dtype
            return out

        loss = accumulated_step(fwd, opt, [(x, _soft(y))], torch.device("cpu"), precision)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        grads[precision] = model.fc.weight.grad.clone()
    assert seen == {"fp32": torch.float32, "bf16": torch.bfloat16}
    assert grads["bf16"].dtype == torch.float32
    torch.testing.assert_close(grads["bf16"], grads["fp32"], atol=2e-2, rtol=0.1)
    assert not torch.equal(grads["bf16"], grads["fp32"])


def test_randaugment_and_random_erasing_change_the_training_images():
    """rand-m9-mstd0.5-inc1 and reprob: the images change, seeded (same seed, same images), and the global
    RNG (dropout, drop path) is left where it was; reprob 1 erases a box of noise in every image."""
    from selfsup.eval.finetune import RandAug, timm_train_transform

    g = torch.Generator().manual_seed(3)
    u8 = torch.randint(0, 256, (8, 3, 16, 16), generator=g, dtype=torch.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = (u8.float() / 255 - m) / s
    c = _cfg(randaugment="rand-m9-mstd0.5-inc1", reprob=0.0)
    aug = RandAug(*c.randaugment_params(), mean)
    state = torch.get_rng_state()
    a = timm_train_transform(x, c, mean, std, aug, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, timm_train_transform(x, c, mean, std, aug, seed=5))
    assert not torch.equal(a, timm_train_transform(x, c, mean, std, aug, seed=6))
    changed = [(a[i] - x[i]).abs().max() > 1e-3 for i in range(8)]
    assert sum(changed) >= 2, changed  # p 0.5 per op, 2 ops: about 3 images in 4 change
    back = ((a * s + m) * 255).round()  # RandAugment works on uint8 pixels
    torch.testing.assert_close(back, back.clamp(0, 255).round(), atol=1e-3, rtol=0)
    e = timm_train_transform(x, _cfg(reprob=1.0), mean, std, None, seed=5)
    erased = (e != x).flatten(1).float().mean(1)  # the share of each image's values replaced by noise
    assert ((erased > 0.0) & (erased < 0.4)).all(), erased
    assert torch.equal(timm_train_transform(x, _cfg(), mean, std, None, seed=5), x)  # off: untouched


def test_mean_pool_reads_the_patch_tokens_through_fc_norm():
    """pool mean: the mean of the last block's patch tokens (before the final norm) through fc_norm
    (MAE's global_pool); fc_norm is in the classifier's layer with no weight decay; the final norm is
    unused."""
    from selfsup.eval.finetune import MeanPool

    bb = _vit_model().backbone.eval()
    pooled = MeanPool(bb).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        t = x
        vit = bb.trunk.vit
        t = vit.conv_proj(t).flatten(2).transpose(1, 2)
        t = torch.cat([vit.class_token.expand(3, -1, -1), t], 1) + vit.encoder.pos_embedding
        for layer in vit.encoder.layers:
            t = layer(t)
        ref = nn.functional.layer_norm(t[:, 1:].mean(1), (16,), eps=1e-6)
        torch.testing.assert_close(pooled(x), ref)
        pooled.fc_norm.weight.fill_(2.0)
        torch.testing.assert_close(pooled(x), 2 * ref)
        bb.trunk.vit.encoder.ln.weight.fill_(3.0)
        torch.testing.assert_close(pooled(x), 2 * ref)
    model = nn.Module()
    model.backbone, model.fc = pooled, nn.Linear(16, 10)
    groups = param_groups_lrd(model, 0.05, 0.5, 2)
    g = next(g for g in groups if any(p is pooled.fc_norm.weight for p in g["params"]))
    assert g["lr_scale"] == 1.0 and g["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="finetune.pool"):
        MeanPool(build_backbone("smallcnn", 1))


def test_head_init_std_and_scale():
    """MAE: weight N(0, 2e-5), bias 0; BEiT: N(0, 0.02) x 0.001; 0: nn.Linear's init, scaled."""
    from selfsup.eval.finetune import init_head

    fc = nn.Linear(512, 100)
    init_head(fc, 2e-5, 1.0, torch.Generator().manual_seed(0))
    assert fc.weight.std().item() == pytest.approx(2e-5, rel=0.05) and not fc.bias.any()
    init_head(fc, 0.02, 0.001, torch.Generator().manual_seed(0))
    assert fc.weight.std().item() == pytest.approx(2e-5, rel=0.05)
    torch.manual_seed(0)
    fc = nn.Linear(512, 100)
    default = fc.weight.detach().clone()
    init_head(fc, 0.0, 0.5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(fc.weight.detach(), 0.5 * default)


def test_a_short_finetune_with_the_papers_keys(digits):
    """bf16, micro-batches of 64, RandAugment, random erasing, mean pooling and BEiT's head init run together on a
    ViT; the protocol names them."""
    cfg = make_cfg(methods=["random"], finetune={"epochs": 1, "warmup_epochs": 0, "batch_size": 128, "lr": 4e-3,
                                                 "mixup": 0.0, "cutmix": 0.0, "flip": False, "precision": "bf16",
                                                 "micro_batch": 64, "randaugment": "rand-m9-mstd0.5-inc1",
                                                 "reprob": 0.25, "pool": "mean", "head_init_std": 0.02,
                                                 "head_init_scale": 0.001})
    from selfsup.data.prepared import Data, Split

    small = Data(Split(np.asarray(digits.train.x[:512]), digits.train.y[:512]), digits.test, digits.meta)
    bb = build_backbone("vit_digits", 1, image_size=8)
    out = finetune(bb, small, cfg, torch.device("cpu"), 0)
    assert math.isfinite(out["final_loss"]) and 0 <= out["top1"] <= 100
    for part in ("bf16 autocast", "micro-batches of 64 (B = 128)", "RandAugment rand-m9-mstd0.5-inc1", "random erasing 0.25",
                 "mean-pooled", "head init N(0, 0.02) x 0.001"):
        assert part in out["protocol"], part


@pytest.mark.parametrize("key,value,match", [
    ("precision", "fp8", "finetune.precision"), ("micro_batch", -1, "finetune.micro_batch"), ("batch_size", 0, "finetune.batch_size"),
    ("pool", "max", "finetune.pool"), ("reprob", 1.5, "finetune.reprob"),
    ("randaugment", "rand-m9-mstd0.5", "finetune.randaugment: only timm's increasing"),
    ("randaugment", "rand-m12-inc1", "finetune.randaugment: expected"),
    ("randaugment", "auto-m9-inc1", "finetune.randaugment: expected"),
    ("head_init_std", -1.0, "finetune.head_init_std")])
def test_bad_paper_keys_are_named(key, value, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**{key: value})
    assert _cfg(randaugment="rand-n3-m7-mstd0.5-inc1").randaugment_params() == (3, 7.0, 0.5)

"""The fine-tuning evaluation (selfsup/finetune.py): layer-wise lr decay of a ViT as MAE's
param_groups_lrd, soft targets of label smoothing / mixup / CutMix, bad keys named, and a short run on
digits that learns (and leaves the pretrained encoder file untouched)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_cfg
from selfsup.config import ConfigError
from selfsup.finetune import finetune, mix_batch, param_groups_lrd, vit_layer_id
from selfsup.models import build_backbone


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
    from selfsup.models import load_backbone, save_backbone
    from selfsup.train import build_method

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
    from selfsup.heads import hidden_layers, projection_head

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
    from selfsup.frozen import finetune_step
    from selfsup.models import save_backbone
    from selfsup.stage import Paths
    from selfsup.train import build_method

    P = Paths(tmp_path)
    ft = {"epochs": 1, "warmup_epochs": 0, "batch_size": 64, "lr": 4e-3, "mixup": 0.0, "cutmix": 0.0}
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

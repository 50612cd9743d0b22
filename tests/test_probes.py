"""Per-layer linear probes (selfsup/probes.py): the stages of each backbone, the papers' ~9k pooled
sizes on AlexNet, hooked activations equal to a manual forward, and probes that learn on digits."""
import numpy as np
import pytest
import torch

from conftest import make_cfg
from selfsup.config import ConfigError, ProbeCfg, build
from selfsup.data import Split
from selfsup.models import build_backbone
from selfsup.probes import layer_features, pool_side, probe_all, probe_points
from selfsup.train import pretrain

CPU = torch.device("cpu")


def images(n, size, ch=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, ch), dtype=np.uint8)
    meta = {"classes": ["a", "b"], "mean": [0.5] * ch, "std": [0.25] * ch, "channels": ch}
    return Split(x, (np.arange(n) % 2).astype(np.int64)), meta


def test_alexnet_stages_pool_to_the_papers_sizes():
    """DeepCluster's eval_linear: conv1 96x10x10, conv2 256x6x6, conv3 / conv4 384x5x5, conv5 256x6x6."""
    net = build_backbone("alexnet_bn", 3)
    assert list(probe_points(net)) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    split, meta = images(2, 224)
    f = layer_features(net, split, meta, CPU, list(probe_points(net)), workers=0)
    assert {k: v.shape[1] for k, v in f.items()} == {"conv1": 9600, "conv2": 9216, "conv3": 9600, "conv4": 9600,
                                                     "conv5": 9216}
    assert list(probe_points(build_backbone("resnet18_cifar", 3))) == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    assert pool_side(512, 4, 9216) == 4  # never above the map's side


def test_hooked_activations_equal_a_manual_forward():
    torch.manual_seed(0)
    net = build_backbone("smallcnn", 1).eval()
    split, meta = images(5, 8, ch=1)
    got = layer_features(net, split, meta, CPU, ["block1", "block3"], target_dim=64, workers=0)
    x = (torch.from_numpy(split.x).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        h1 = net.trunk.net[:3](x)  # (5, 32, 8, 8): conv, BN, ReLU
        h3 = net.trunk.net[:10](x)  # block3's ReLU (after the max-pool)
    ref1 = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h1, pool_side(32, 8, 64)), 1).numpy()
    ref3 = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h3, pool_side(128, 4, 64)), 1).numpy()
    np.testing.assert_allclose(got["block1"], ref1, atol=1e-5)
    np.testing.assert_allclose(got["block3"], ref3, atol=1e-5)
    with pytest.raises(ValueError, match="probe.layers: 'conv9'"):
        layer_features(net, split, meta, CPU, ["conv9"], workers=0)


def test_probes_learn_on_digits(digits, tmp_path):
    sup, _ = pretrain(make_cfg(supervised={"epochs": 2}), "supervised", digits, tmp_path / "s.pt")
    cfg = build(ProbeCfg, {"layers": ["all"], "epochs": 10, "max_train": 600})
    out = probe_all(sup.backbone, digits, CPU, cfg, seed=0, workers=0)
    layers = out["layers"]
    assert list(layers) == ["block1", "block2", "block3"]
    assert all(50.0 < r["top1"] <= 100.0 for r in layers.values()), layers
    assert layers["block3"]["dim"] == 128 * 4 * 4  # 9216 / 128 asks for 8x8: capped at the 4x4 map
    with pytest.raises(ConfigError, match="probe.layers"):
        build(ProbeCfg, {"layers": ["all", "block1"]}, "probe")


def test_moco_linear_protocol_trains_on_augmented_views(digits, tmp_path):
    """MoCo's main_lincls: a linear classifier on the frozen encoder, fresh crops every epoch, x0.1
    steps; the encoder (BN statistics included) stays untouched."""
    from selfsup.features import extract_features
    from selfsup.lincls import augmented_linear_probe

    sup, _ = pretrain(make_cfg(supervised={"epochs": 2}), "supervised", digits, tmp_path / "s.pt")
    bb = sup.backbone
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    te = extract_features(bb, digits.test, digits.meta, CPU)
    cfg = make_cfg(linear={"protocol": "augmented", "epochs": 4, "lr": 1.0, "lr_steps": [3],
                           "weight_decay": 0.0, "crop_scale": [0.5, 1.0], "flip": False})
    out = augmented_linear_probe(bb, digits, cfg, te, digits.test.y, CPU, seed=0)
    assert out["top1"] > 85.0 and "augmented" in out["protocol"]
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())  # frozen, BN included
    other = augmented_linear_probe(bb, digits, cfg, te, digits.test.y, CPU, seed=1)
    assert other["final_loss"] != out["final_loss"]  # other seed, other crops


# --------------------------------------------------------------------------- the paper protocol
def _slow_ten_crops(img, resize, crop):
    """One image (C, H, W): torchvision's resize, then the four corners, the centre, and the same five
    boxes of the mirrored image, cut out by hand."""
    from torchvision.transforms.v2 import functional as F

    r = F.resize(img, [resize], antialias=True)
    h, w = r.shape[1:]
    boxes = [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop),
             (int(round((h - crop) / 2)), int(round((w - crop) / 2)))]
    out = [r[:, t:t + crop, left:left + crop] for t, left in boxes]
    mirrored = r.flip(-1)
    return out + [mirrored[:, t:t + crop, left:left + crop] for t, left in boxes]


def test_ten_crop_average_equals_a_slow_loop_over_the_crops():
    """The paper protocol's test: the softmax of each of the ten crops averaged (DeepCluster's
    --tencrops), batched, equals a loop over images and crops; image arrays are upsampled by
    resize / crop and cropped at their native side; files (any size) as Resize + TenCrop."""
    from selfsup.features import normalize
    from selfsup.probes import ten_crop_batches, ten_crops, tencrop_scores

    torch.manual_seed(0)
    net = build_backbone("smallcnn", 3).eval()
    fc = torch.nn.Linear(128, 2)
    split, meta = images(3, 12)
    with torch.no_grad():
        (xb,) = list(ten_crop_batches(split, 8, resize=256, crop=224))  # (3, 10, 3, 12, 12)
        got = tencrop_scores(fc(net(normalize(xb.flatten(0, 1), meta["mean"], meta["std"]))))
        for i in range(3):
            img = torch.from_numpy(split.x[i]).permute(2, 0, 1)
            crops = _slow_ten_crops(img, round(12 * 256 / 224), 12)
            probs = [torch.softmax(fc(net(normalize(c[None], meta["mean"], meta["std"]))), 1)[0] for c in crops]
            torch.testing.assert_close(got[i], torch.stack(probs).mean(0), atol=1e-6, rtol=1e-5)
            one = torch.softmax(fc(net(normalize(crops[4][None], meta["mean"], meta["std"]))), 1)[0]
            assert not torch.allclose(got[i], one, atol=1e-4)  # not the centre crop alone
    img = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)  # a file's image: not square
    for k, c in enumerate(_slow_ten_crops(img, 16, 12)):
        assert torch.equal(ten_crops(img[None], 16, 12)[0, k], c), k


def test_max_pooling_option():
    """probe.pooling max: adaptive max pooling of the activation to the same grid (SeLa / RotNet)."""
    torch.manual_seed(0)
    net = build_backbone("smallcnn", 1).eval()
    split, meta = images(4, 8, ch=1)
    got = layer_features(net, split, meta, CPU, ["block1"], target_dim=64, workers=0, pooling="max")
    x = (torch.from_numpy(split.x).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        h1 = net.trunk.net[:3](x)
    ref = torch.flatten(torch.nn.functional.adaptive_max_pool2d(h1, pool_side(32, 8, 64)), 1).numpy()
    np.testing.assert_allclose(got["block1"], ref, atol=1e-6)
    avg = layer_features(net, split, meta, CPU, ["block1"], target_dim=64, workers=0)
    assert not np.allclose(avg["block1"], ref)


def test_paper_protocol_trains_every_layer_on_crops(digits):
    """probe.protocol paper on digits: every layer's probe from one pass per batch, random crops, a
    10-crop test; the encoder untouched (BN statistics included); the whole training set (max_train
    refused)."""
    from selfsup.data import Data
    from selfsup.train import batch_maker

    cfg = make_cfg(methods=["random"])
    torch.manual_seed(0)
    net = build_backbone("smallcnn", 1).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    small = Data(Split(np.asarray(digits.train.x[:512]), digits.train.y[:512]), digits.test, digits.meta)
    pc = build(ProbeCfg, {"layers": ["all"], "epochs": 2, "batch_size": 64, "protocol": "paper", "pooling": "max"})
    out = probe_all(net, small, CPU, pc, seed=0, workers=0, make=batch_maker(cfg, small, CPU))
    assert list(out["layers"]) == ["block1", "block2", "block3"] and "10-crop" in out["protocol"]
    assert all(30.0 < r["top1"] <= 100.0 for r in out["layers"].values()), out["layers"]
    assert out["layers"]["block3"]["dim"] == 128 * 4 * 4
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="probe.protocol: paper needs"):
        probe_all(net, small, CPU, pc, seed=0, workers=0)
    with pytest.raises(ConfigError, match="probe.max_train"):
        build(ProbeCfg, {"protocol": "paper", "max_train": 100}, "probe")
    with pytest.raises(ConfigError, match="probe.pooling"):
        build(ProbeCfg, {"pooling": "sum"}, "probe")

"""Per-layer linear probes (selfsup/eval/layer_probes.py): the stages of each backbone, the papers' ~9k pooled
sizes on AlexNet, hooked activations equal to a manual forward, and probes that learn on digits."""
import numpy as np
import pytest
import torch

from conftest import make_cfg
from selfsup.core.config import ConfigError, build
from selfsup.eval.config import ProbeCfg
from selfsup.data.prepared import Split
from selfsup.models.backbones import build_backbone
from selfsup.eval.layer_probes import layer_features, pool_side, probe_all
from selfsup.models.backbones import probe_points
from selfsup.engine.loop import pretrain

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
    from selfsup.models.features import extract_features
    from selfsup.eval.augmented_linear import augmented_linear_probe

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
    from selfsup.models.features import normalize
    from selfsup.eval.layer_probes import ten_crop_batches, ten_crops, tencrop_scores

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
    from selfsup.data.prepared import Data
    from selfsup.data.batches import batch_maker

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


# --------------------------------------------------------------------------- the official probe recipes
def _caffe_resize_loop(a, side):
    """A slow transcription of the Caffe Resize layer's Forward_cpu (philkr's Caffe, resize_layer.cpp, which
    the colourisation repo's linear test runs): per axis, scale (out - 1) / (in - 1); when below 1 a tent
    filter of radius 1 / scale (weights R - r for the integers r < R, edges clamped, divided by
    (2 floor(R) + 1) R - floor(R) (floor(R) + 1)); then linear interpolation at x = i / scale."""
    def tent(v, radius):  # one line
        n, ir = len(v), int(radius)
        norm = (2 * ir + 1) * radius - ir * (ir + 1)
        out = np.empty(n)
        for x in range(n):
            s, r = radius * v[x], 1
            while r < radius:
                s += (radius - r) * (v[max(x - r, 0)] + v[min(x + r, n - 1)])
                r += 1
            out[x] = s / norm
        return out

    def lerp(v, n_out, scale):
        n, out = len(v), np.empty(n_out)
        for i in range(n_out):
            x = min(max(i / scale, 0.0), n - 1.0)
            i0 = int(x)
            i1 = min(i0 + 1, n - 1)
            out[i] = (i1 - x) * v[i0] + (1 - (i1 - x)) * v[i1]
        return out

    def axis(v, n_out):
        scale = (n_out - 1) / (len(v) - 1)
        if scale < 1:
            v = tent(v, 1.0 / max(scale, 0.01))
        return lerp(v, n_out, scale)

    b, c, h, w = a.shape
    rows = np.stack([[[axis(a[i, k, y], side) for y in range(h)] for k in range(c)] for i in range(b)])  # (b, c, h, side)
    return np.stack([[[axis(rows[i, k, :, x], side) for x in range(side)] for k in range(c)] for i in range(b)]
                    ).transpose(0, 1, 3, 2)  # (b, c, side, side)


@pytest.mark.parametrize("h,side", [(55, 10), (27, 6), (13, 5), (13, 6), (6, 6)])
def test_bilinear_pooling_is_caffes_resize_layer(h, side):
    """probe.pooling bilinear: the AlexNet maps at 227 px (conv1 55, conv2 27, conv3-5 13) to the linear
    test's grids, equal to a loop over the official layer; not the average pooling it replaces."""
    from selfsup.eval.layer_probes import caffe_resize, pool

    a = torch.from_numpy(np.random.default_rng(h + side).normal(size=(2, 3, h, h)))
    got = caffe_resize(a, side)
    np.testing.assert_allclose(got.numpy(), _caffe_resize_loop(a.numpy(), side), atol=1e-10)
    if h != side:
        assert not torch.allclose(got, torch.nn.functional.adaptive_avg_pool2d(a, side), atol=1e-3)
    assert pool(a.float(), target_dim=3 * side * side, pooling="bilinear").shape == (2, 3, side, side)


def test_step_schedules_are_rotnets_lut_and_caffes_step_policy():
    """probe.lr_schedule step: RotNet's adjust_learning_rates (the LUT_lr entry of the first bound above
    the epoch, the last one after) for both official configs, and the colourisation solver's Caffe
    step policy (0.01 x 0.1 ^ floor(iter / 40000)) with iteration milestones."""
    from selfsup.eval.layer_probes import step_lr

    for lr, steps, factors, lut, epochs in [
            (0.1, [20, 40, 45], [0.2, 0.04, 0.008], [(20, 0.1), (40, 0.02), (45, 0.004), (50, 0.0008)], 100),
            (0.01, [5, 15, 25], [0.2, 0.04, 0.008], [(5, 0.01), (15, 0.002), (25, 0.0004), (35, 0.00008)], 35)]:
        cfg = build(ProbeCfg, {"lr": lr, "lr_steps": steps, "lr_factors": factors, "nesterov": True})
        for ep in range(epochs):
            want = next((v for (bound, v) in lut if bound > ep), lut[-1][1])
            assert step_lr(cfg, ep, 12345) == pytest.approx(want, rel=1e-12), ep
    caffe = build(ProbeCfg, {"lr": 0.01, "lr_steps": [40000, 80000, 120000], "lr_step_unit": "iteration"})
    for it in (0, 39999, 40000, 79999, 80000, 120000, 139999):
        assert step_lr(caffe, 27, it) == pytest.approx(0.01 * 0.1 ** (it // 40000), rel=1e-12), it
    assert step_lr(build(ProbeCfg, {}), 29, 10 ** 6) == 0.1  # the typed default: step without milestones
    for over, key in [({"lr_steps": [5, 2]}, "probe.lr_steps"), ({"lr_steps": [5], "lr_factors": [0.1, 0.2]},
                      "probe.lr_factors"), ({"lr_schedule": "cosine", "lr_steps": [5]}, "probe.lr_steps"),
                      ({"lr_step_unit": "batch"}, "probe.lr_step_unit"), ({"classifier": "svm"}, "probe.classifier")]:
        with pytest.raises(ConfigError, match=key):
            build(ProbeCfg, over, "probe")


def test_mlp_classifier_is_rotnets_multlayer():
    """probe.classifier mlp: NonLinearClassifier.py's MultLayer for CIFAR-10 (200 = min(20 x 10, 2048)
    hidden units, bias-free hidden Linears, its N(0, sqrt(2 / out)) init); the paper protocol puts no
    affine-free BN before it."""
    from selfsup.eval.linear_probe import mlp_classifier
    from selfsup.eval.layer_probes import paper_heads

    net = mlp_classifier(192 * 8 * 8, 10, torch.Generator().manual_seed(0))
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [m.out_features for m in net if isinstance(m, torch.nn.Linear)] == [200, 200, 10]
    assert net[0].bias is None and net[3].bias is None and net[6].bias is not None
    assert float(net[0].weight.detach().std()) == pytest.approx((2 / 200) ** 0.5, rel=0.02)
    assert mlp_classifier(8, 1000, torch.Generator()).__getitem__(0).out_features == 2048
    cfg = build(ProbeCfg, {"classifier": "mlp"})
    heads = paper_heads({"block2": torch.zeros(2, 192, 8, 8)}, cfg, 10, torch.Generator().manual_seed(0))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in heads["block2"].modules())
    lin = paper_heads({"b": torch.zeros(2, 4, 2, 2)}, build(ProbeCfg, {}), 10, torch.Generator())
    assert isinstance(lin["b"][0], torch.nn.BatchNorm2d) and not lin["b"][0].affine


def test_fast_probe_takes_the_schedule_nesterov_and_mlp(monkeypatch):
    """The fast protocol's classifier (selfsup.eval.linear_probe.linear_probe) with a step schedule, Nesterov SGD and
    the MLP: the lr of every step is the schedule's, the optimiser Nesterov's, and it learns a separable
    problem."""
    import selfsup.eval.linear_probe as L

    seen = {}

    class Recording(torch.optim.SGD):
        def __init__(self, params, **kw):
            seen.update(kw)
            super().__init__(params, **kw)

        def step(self, closure=None):
            seen.setdefault("lrs", []).append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(L.torch.optim, "SGD", Recording)
    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    x = (rng.normal(size=(200, 6)) + 3 * y[:, None]).astype(np.float32)
    out = L.linear_probe(x, y, x, y, 2, epochs=4, batch_size=50, lr=0.1, weight_decay=0.0, seed=0, device=CPU,
                         lr_at=lambda ep, st: 0.1 * (0.5 if ep >= 2 else 1.0), nesterov=True, classifier="mlp")
    assert seen["nesterov"] is True and seen["lrs"] == [0.1] * 8 + [0.05] * 8
    assert out["top1"] > 95.0

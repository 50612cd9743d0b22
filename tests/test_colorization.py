"""Colourisation (Zhang et al. 2016, issue 13): skipped with its reason on the grayscale digits, the
L-channel input adapter saved with the encoder, the training loss against a slow per-pixel reference,
and on the CIFAR-10 copy (../shared/datasets, skipped cleanly without it) a few epochs beat the
random-init encoder on kNN and draw the picture."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, make_cfg
from selfsup.augment.colour import ab_bins, rebalance_weights, rgb_to_lab, soft_encode
from selfsup.core.config import load_config
from selfsup.data.prepared import Data, Split
from selfsup.models.features import extract_features
from selfsup.eval.knn import knn_eval
from selfsup.engine.contract import Batch
from selfsup.models.backbones import LabL, load_backbone, save_backbone
from selfsup.engine.pictures import method_pictures, save_png
from selfsup.engine.loop import build_method, pretrain

CPU = torch.device("cpu")
CIFAR = Path(os.environ.get("SELFSUP_SHARED_DATASETS", ROOT.parent / "shared" / "datasets")) / "cifar10-jpeg.tar.xz"


def colour_data(n=16, side=16, seed=0):
    rng = np.random.default_rng(seed)

    def split(k):
        return Split(rng.integers(0, 256, (k, side, side, 3), dtype=np.uint8), (np.arange(k) % 4).astype(np.int64))

    meta = {"name": "colour stand-in", "classes": list("abcd"), "n_train": n, "n_test": n // 2,
            "image_size": [side, side], "channels": 3, "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]}
    return Data(split(n), split(n // 2), meta)


def test_skipped_on_grayscale_with_its_reason(digits, tmp_path):
    m, hist = pretrain(make_cfg(methods=["colorization"]), "colorization", digits, tmp_path / "ck.pt")
    assert hist == [] and "grayscale" in m.skipped and m.backbone.adapter is None
    pics = method_pictures(m, digits, CPU, 4)
    assert set(pics) == {"colorization.png"} and pics["colorization.png"].dtype == np.uint8


def test_encoder_carries_its_l_channel_adapter(tmp_path):
    data = colour_data()
    cfg = make_cfg(methods=["colorization"])
    m = build_method(cfg, "colorization", data).eval()
    assert isinstance(m.backbone.adapter, LabL) and m.backbone.in_channels == 3
    x = torch.randn(3, 3, 16, 16)
    rgb = (x * torch.tensor(data.meta["std"]).view(1, 3, 1, 1) + torch.tensor(data.meta["mean"]).view(1, 3, 1, 1))
    expect = rgb_to_lab(rgb.clamp(0, 1))[:, :1] - 50.0
    assert torch.allclose(m.backbone.adapter(x), expect, atol=1e-4)
    save_backbone(tmp_path / "m.pt", m, cfg, data.meta)
    net = load_backbone(tmp_path / "m.pt", CPU)  # what extract / probes / VOC load: RGB in, no method code
    assert isinstance(net.adapter, LabL) and net.in_channels == 3
    with torch.no_grad():
        assert torch.allclose(net(x), m.backbone(x), atol=1e-5)


def _reference_loss(m, x, stride):
    """Slow per-pixel reference of the official training layers: ab at every ``stride``-th pixel
    (data_ab_ss) or average-pooled to the map (stride 0), the logits resized bilinearly to that grid
    (fc8_upsample), soft-encoded targets (NNEncLayer), the rebalancing weight of the target's most
    likely bin (PriorBoostLayer) times the image's non-grey mask (NonGrayMaskLayer: some sampled |a| or
    |b| above 5), the cross-entropy averaged over every sampled pixel."""
    with torch.no_grad():
        logits = m.logits(x)  # (B, Q, h, w)
        h, w = logits.shape[-2:]
        ab = rgb_to_lab(m.rgb(x))[:, 1:]  # (B, 2, S, S)
        side = x.shape[-1]
        if stride:
            pos = list(range(0, side, stride))
            grid = [[ab[:, :, i, j] for j in pos] for i in pos]  # per pixel (B, 2)
            logits = torch.nn.functional.interpolate(logits, size=(len(pos), len(pos)), mode="bilinear",
                                                     align_corners=False)
        else:
            pos = list(range(h))
            grid = [[ab[:, :, i * side // h:(i + 1) * side // h, j * side // w:(j + 1) * side // w].mean((2, 3))
                     for j in range(w)] for i in range(h)]
        total, count = 0.0, 0
        for b in range(len(x)):
            grey = all(float(grid[i][j][b].abs().max()) <= 5.0 for i in range(len(pos)) for j in range(len(pos)))
            for i in range(len(pos)):
                for j in range(len(pos)):
                    z = soft_encode(grid[i][j][b].view(1, 2, 1, 1), m.centres, m.cfg.soft_k, 5.0).view(-1)
                    logp = torch.log_softmax(logits[b, :, i, j], 0)
                    wt = 0.0 if (grey and m.cfg.nongray_mask) else float(m.weights[z.argmax()])
                    total += wt * float(-(z * logp).sum())
                    count += 1
    return total / count


@pytest.mark.parametrize("stride", [8, 0])
def test_loss_matches_a_per_pixel_reference(stride):
    data = colour_data()
    m = build_method(make_cfg(methods=["colorization"], colorization={"target_stride": stride}), "colorization",
                     data).eval()
    assert m.cfg.soft_k == 10 and m.cfg.nongray_mask and len(m.centres) == 313
    prior = torch.rand(len(m.centres), dtype=torch.float64)
    m.prior.copy_(prior / prior.sum())
    m.weights.copy_(rebalance_weights(m.prior, 0.5).float())
    x = torch.randn(3, 3, 16, 16)
    # the third image grey: ab 0 everywhere, weight 0 under the non-grey mask
    mean, std = torch.tensor(data.meta["mean"]).view(3, 1, 1), torch.tensor(data.meta["std"]).view(3, 1, 1)
    x[2] = (torch.full((3, 16, 16), 0.4) - mean) / std
    out = m(Batch([x], torch.zeros(3, dtype=torch.long), torch.arange(3)))
    assert abs(float(out.loss.detach()) - _reference_loss(m, x, stride)) < 1e-4
    assert 0.0 <= float(out.logs["pretext_acc"]) <= 1.0


def test_nongray_mask_zeroes_grey_images():
    data = colour_data()
    m = build_method(make_cfg(methods=["colorization"]), "colorization", data).eval()
    mean, std = torch.tensor(data.meta["mean"]).view(3, 1, 1), torch.tensor(data.meta["std"]).view(3, 1, 1)
    grey = ((torch.full((2, 3, 16, 16), 0.3) + 0.2 * torch.rand(2, 1, 16, 16)) - mean) / std  # R = G = B
    with torch.no_grad():
        assert float(m(Batch([grey], torch.zeros(2, dtype=torch.long), torch.arange(2))).loss) == 0.0
        m.cfg.nongray_mask = False
        assert float(m(Batch([grey], torch.zeros(2, dtype=torch.long), torch.arange(2))).loss) > 0.0


def test_fixed_train_crop_is_an_unscaled_window():
    data = colour_data(side=16)
    cfg = make_cfg(methods=["colorization"], colorization={"train_crop": "fixed", "load_size": 16, "view_size": 10,
                                                           "augment": "crop_flip"})
    m = build_method(cfg, "colorization", data)
    spec = m.view_specs()[0]
    assert not spec.crop and spec.size == 16 and spec.flip_p == 0.5  # the whole image, mirrored
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    torch.manual_seed(0)
    v = m.train_view(x)
    assert v.shape == (2, 3, 10, 10)
    for b in range(2):  # each crop is a contiguous 10 x 10 window of its own image
        top, left = divmod(int((v[b, 0, 0, 0] - x[b, 0, 0, 0]).item()), 16)
        assert torch.equal(v[b], x[b, :, top:top + 10, left:left + 10])
    with pytest.raises(Exception, match="view_size"):
        make_cfg(methods=["colorization"], colorization={"train_crop": "fixed", "load_size": 8, "view_size": 10})


def test_bins_are_the_official_in_gamut_set():
    c = ab_bins(10)
    assert len(c) == 313 and bool((c % 10 == 0).all())
    assert len(ab_bins(10, rule="cells")) == 262


def test_soft_encoding_is_the_official_ten_neighbour_layer():
    """NNEncLayer: the NN = 10 nearest of the 313 centres, Gaussian weights of sigma 5, normalised;
    against a per-pixel loop over all centres."""
    c = ab_bins()
    g = torch.Generator().manual_seed(1)
    ab = torch.rand(2, 2, 3, 3, generator=g) * 180 - 90  # (2, 2, 3, 3)
    z = soft_encode(ab, c, 10, 5.0)  # (2, 313, 3, 3)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                d2 = ((c.double() - ab[b, :, i, j].double()) ** 2).sum(1)  # (313,)
                near = d2.argsort()[:10]
                wts = torch.exp(-d2[near] / 50.0)
                ref = torch.zeros(len(c), dtype=torch.float64)
                ref[near] = wts / wts.sum()
                assert torch.allclose(z[b, :, i, j].double(), ref, atol=1e-6)


@pytest.fixture(scope="module")
def cifar_small(tmp_path_factory):
    if not CIFAR.is_file():
        pytest.skip(f"{CIFAR} not present (the CIFAR-10 JPEG copy beside the checkout)")
    from selfsup.data.prepared import load_prepared
    from selfsup.data.sources import prepare

    root = tmp_path_factory.mktemp("cifar")
    ds = {"name": "imagefolder", "path": str(CIFAR), "root": str(root / "raw"), "image_size": 32,
          "max_train": 2000, "max_test": 500}
    prepare(load_config({"methods": ["random"], "dataset": ds}).dataset, 0, root / "ds")
    return ds, load_prepared(root / "ds")


def test_colourisation_beats_random_init_on_cifar10(cifar_small, tmp_path):
    ds, data = cifar_small

    def knn(name, **over):
        cfg = load_config({"methods": [name], "device": "cpu", "dataset": ds, **over})
        m, hist = pretrain(cfg, name, data, tmp_path / name / "ck.pt")
        tr = extract_features(m.backbone, data.train, data.meta, CPU)
        te = extract_features(m.backbone, data.test, data.meta, CPU)
        return knn_eval(tr, data.train.y, te, data.test.y, 200, 0.07, 10)["top1"], hist, m

    rand, _, _ = knn("random")
    col, hist, m = knn("colorization", colorization={"epochs": 5, "batch_size": 64, "lr": 0.05, "momentum": 0.9,
                                                     "weight_decay": 5e-4, "augment": "crop_flip",
                                                     "crop_scale": [0.5, 1.0]})
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert float(m.prior.sum()) == pytest.approx(1.0) and float(m.weights.min()) > 0
    assert col > rand + 1.0, (col, rand)
    pics = method_pictures(m, data, CPU, 8)
    img = pics["colorization.png"]
    assert img.shape == (3 * 32, 8 * 32, 3)
    # rows: originals, their L with zero ab (gray), colourised: same L, so the rows differ in colour only
    gray = img[32:64].astype(int)
    assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 2 and np.abs(img[64:].astype(int) - gray).max() > 10
    save_png(tmp_path / "c.png", img, scale=3)
    assert (tmp_path / "c.png").stat().st_size > 0

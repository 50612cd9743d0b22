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
from selfsup.colour import ab_bins, rebalance_weights, rgb_to_lab, soft_encode
from selfsup.config import load_config
from selfsup.data import Data, Split
from selfsup.features import extract_features
from selfsup.knn import knn_eval
from selfsup.methods.base import Batch
from selfsup.models import LabL, load_backbone, save_backbone
from selfsup.pictures import method_pictures, save_png
from selfsup.train import build_method, pretrain

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


def test_loss_matches_a_per_pixel_reference():
    data = colour_data()
    m = build_method(make_cfg(methods=["colorization"]), "colorization", data).eval()
    prior = torch.rand(len(m.centres), dtype=torch.float64)
    m.prior.copy_(prior / prior.sum())
    m.weights.copy_(rebalance_weights(m.prior, 0.5).float())
    x = torch.randn(2, 3, 16, 16)
    out = m(Batch([x], torch.zeros(2, dtype=torch.long), torch.arange(2)))
    with torch.no_grad():
        logits = m.logits(x)  # (2, Q, h, w)
        h, w = logits.shape[-2:]
        ab = rgb_to_lab(m.rgb(x))[:, 1:]  # (2, 2, 16, 16)
        total, count = 0.0, 0
        for b in range(2):
            for i in range(h):
                for j in range(w):
                    # the target is the mean ab of the pixels the map cell covers, soft-encoded
                    cell = ab[b, :, i * 16 // h:(i + 1) * 16 // h, j * 16 // w:(j + 1) * 16 // w].mean((1, 2))
                    z = soft_encode(cell.view(1, 2, 1, 1), m.centres, 5, 5.0).view(-1)
                    logp = torch.log_softmax(logits[b, :, i, j], 0)
                    total += float(m.weights[z.argmax()] * -(z * logp).sum())
                    count += 1
    assert abs(float(out.loss.detach()) - total / count) < 1e-4
    assert 0.0 <= float(out.logs["pretext_acc"]) <= 1.0


def test_bins_are_the_documented_in_gamut_set():
    c = ab_bins(10)
    assert len(c) == 262 and bool((c % 10 == 0).all())


@pytest.fixture(scope="module")
def cifar_small(tmp_path_factory):
    if not CIFAR.is_file():
        pytest.skip(f"{CIFAR} not present (the CIFAR-10 JPEG copy beside the checkout)")
    from selfsup.data import load_prepared
    from selfsup.sources import prepare

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

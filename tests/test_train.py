"""Training: DeepCluster learns on digits, resume is exact, NaN stops the run."""
import numpy as np
import pytest
import torch

from conftest import assert_resume_is_exact, make_cfg
from selfsup.models.features import extract_features
from selfsup.eval.knn import knn_eval
from selfsup.methods import REGISTRY
from selfsup.engine.loop import pretrain

CPU = torch.device("cpu")


def knn_top1(backbone, data):
    tr = extract_features(backbone, data.train, data.meta, CPU)
    te = extract_features(backbone, data.test, data.meta, CPU)
    return knn_eval(tr, data.train.y, te, data.test.y, 200, 0.07, 10)["top1"]


def test_deepcluster_beats_random_init(digits, tmp_path):
    cfg = make_cfg(deepcluster={"epochs": 6, "batch_size": 32, "lr": 0.1, "k": 50, "pca_dim": 32,
                                "crop_scale": [0.5, 1.0]})
    rand, _ = pretrain(cfg, "random", digits, tmp_path / "r.pt")
    dc, hist = pretrain(cfg, "deepcluster", digits, tmp_path / "dc.pt")
    losses = [h["loss"] for h in hist]
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(h["clusters_nonempty"] > 1 for h in hist)
    assert 0 < hist[-1]["nmi_labels"] <= 1 and 0 < hist[-1]["nmi_prev"] <= 1
    r, d = knn_top1(rand.backbone, digits), knn_top1(dc.backbone, digits)
    assert d > r + 5.0, (d, r)


def test_every_method_starts_from_the_same_init(digits, tmp_path):
    cfg = make_cfg()
    a, _ = pretrain(cfg, "random", digits, tmp_path / "a.pt")
    b, _ = pretrain(cfg, "random", digits, tmp_path / "b.pt")
    c = REGISTRY["supervised"]  # built the same way before training
    from selfsup.engine.loop import build_method
    sup = build_method(cfg, "supervised", digits)
    for (k, v), w, s in zip(a.backbone.state_dict().items(), b.backbone.state_dict().values(),
                            sup.backbone.state_dict().values()):
        assert torch.equal(v, w) and torch.equal(v, s), k
    assert c.needs_labels


def test_resume_after_kill_is_identical(digits, tmp_path):
    cfg = make_cfg(deepcluster={"epochs": 3, "k": 20, "pca_dim": 16})
    # killed right after checkpointing epoch 1, resumed: continues with epochs 2, 3, bit-identical
    assert_resume_is_exact(cfg, "deepcluster", digits, tmp_path)
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["epoch"] == 3


def test_changed_config_starts_fresh(digits, tmp_path):
    ck = tmp_path / "ck.pt"
    pretrain(make_cfg(deepcluster={"epochs": 2, "k": 20, "pca_dim": 16}), "deepcluster", digits, ck)
    epochs_run = []
    cfg2 = make_cfg(deepcluster={"epochs": 2, "k": 25, "pca_dim": 16})
    _, hist = pretrain(cfg2, "deepcluster", digits, ck, on_epoch_end=lambda e, r: epochs_run.append(e))
    assert epochs_run == [1, 2]
    assert hist[0]["clusters_nonempty"] <= 25
    # same config again: nothing left to do
    epochs_run.clear()
    pretrain(cfg2, "deepcluster", digits, ck, on_epoch_end=lambda e, r: epochs_run.append(e))
    assert epochs_run == []


def test_nan_loss_stops_training(digits, tmp_path, monkeypatch):
    sup = REGISTRY["supervised"]
    orig = sup.forward

    def nan_loss(self, batch):
        out = orig(self, batch)
        return type(out)(out.loss * float("nan"), out.logs)

    monkeypatch.setattr(sup, "forward", nan_loss)
    with pytest.raises(FloatingPointError, match="supervised: loss is nan at epoch 1, step 1"):
        pretrain(make_cfg(supervised={"epochs": 1}), "supervised", digits, tmp_path / "s.pt")


def test_supervised_loss_drops(digits, tmp_path):
    _, hist = pretrain(make_cfg(supervised={"epochs": 3}), "supervised", digits, tmp_path / "s.pt")
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"] and hist[-1]["train_acc"] > hist[0]["train_acc"] + 0.2
    assert np.isfinite([h["loss"] for h in hist]).all()


def test_supervised_skips_without_labels(digits, tmp_path, caplog):
    from selfsup.data.prepared import Data, Split

    unl = Data(Split(digits.train.x, np.full_like(digits.train.y, -1)), digits.test, digits.meta)
    m, hist = pretrain(make_cfg(supervised={"epochs": 1}), "supervised", unl, tmp_path / "s.pt")
    assert hist == [] and "no labels" in m.skipped
    assert any("skipped" in r.message for r in caplog.records)


def test_missing_upstream_names_the_file(digits, tmp_path):
    from selfsup.core.io import InputError
    from selfsup.engine.contract import Method

    class Up(Method):  # a throwaway method that reads an upstream encoder
        name = "up_probe"
        Config = REGISTRY["supervised"].Config
        uses_upstream = True

    REGISTRY["up_probe"] = Up
    try:
        cfg = make_cfg(methods={"up_probe": str(tmp_path / "nowhere.pt")})
        with pytest.raises(InputError, match="nowhere.pt"):
            pretrain(cfg, "up_probe", digits, tmp_path / "u.pt")
    finally:
        del REGISTRY["up_probe"]

"""SeLa as a method: the official re-labelling schedule, labels meet the equal partition,
and a few epochs on digits beat the random-init encoder."""
import numpy as np
import torch

from conftest import make_cfg
from selfsup.models.features import extract_features
from selfsup.eval.knn import knn_eval
from selfsup.methods.sela import relabel_epochs
from selfsup.engine.loop import pretrain

CPU = torch.device("cpu")


def test_relabel_schedule_follows_the_official_times():
    # official: optimisation j after (epochs + 1.0001) * j / (times - 1) epochs of data
    assert relabel_epochs(10, 11, "linear") == [0, 2, 3, 4, 5, 6, 7, 8, 9]
    assert relabel_epochs(10, 2, "linear") == [0]  # the second time lies past the end, as in the official code
    quad = relabel_epochs(100, 11, "quadratic")
    assert quad[0] == 0 and len(quad) == 10
    gaps = np.diff(quad)
    assert (np.diff(gaps) >= 0).all() and gaps[0] < gaps[-1]  # denser early
    # brute force: walk the epoch starts, fire each official time at the first start >= it
    times = [(400 + 1.0001) * j / 399 for j in range(400)]
    fired = sorted(e for e in {next(e for e in range(403) if e >= t) for t in times} if e < 400)
    assert relabel_epochs(400, 400, "linear") == fired and fired[:3] == [0, 2, 3]


def knn_top1(backbone, data):
    tr = extract_features(backbone, data.train, data.meta, CPU)
    te = extract_features(backbone, data.test, data.meta, CPU)
    return knn_eval(tr, data.train.y, te, data.test.y, 200, 0.07, 10)["top1"]


def test_sela_epochs_on_digits(digits, tmp_path):
    # 8 epochs: with the official head init (N(0, 0.01)) the first labels come from a nearly flat P,
    # and 6 epochs (enough with PyTorch's default init) end at 76.7 against random init's 79.7
    cfg = make_cfg(methods=["sela", "random"], sela={
        "epochs": 8, "batch_size": 32, "lr": 0.1, "crop_scale": [0.5, 1.0], "heads": 2, "clusters": 30,
        "lam": 10.0, "relabel_times": 9, "weight_decay": 5e-4})
    sela, hist = pretrain(cfg, "sela", digits, tmp_path / "sela.pt")
    rand, _ = pretrain(cfg, "random", digits, tmp_path / "r.pt")
    relabelled = [h for h in hist if "sk_iterations" in h and not np.isnan(h.get("sk_iterations", np.nan))]
    assert len(relabelled) >= 4
    for i, h in enumerate(relabelled):
        assert h["sk_marginal_error"] < 1e-2
        # equal partition: sizes near N / K. Not the first: the heads start as the official code's,
        # N(0, 0.01), so P is nearly flat there and the argmax of the (balanced) Q is not
        assert i == 0 or h["cluster_size_cv"] < 0.5, (i, h["cluster_size_cv"])
        assert 0.0 <= h["nmi_prev"] <= 1.0
    # the first re-labelling replaces the random initial partition: little in common with it
    assert relabelled[0]["nmi_prev"] < 0.5
    assert any(h["nmi_prev"] < 0.999 for h in relabelled[1:])
    # the labels the loss uses are the latest Sinkhorn labels, one row per head
    assert sela.labels.shape == (2, 1437)
    sizes = torch.bincount(sela.labels[0], minlength=30).float()
    assert sizes.min() > 0.5 * 1437 / 30
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert {"loss_head0", "loss_head1"} <= set(hist[-1])
    r, s = knn_top1(rand.backbone, digits), knn_top1(sela.backbone, digits)
    assert s > r + 3.0, (s, r)

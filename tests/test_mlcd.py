"""MLCD: top-l assignment, PartialFC negative sampling, the loss against a slow per-sample
reference from the paper's formula (and gradcheck), resume, upstream handling, and a few epochs
on digits beating the random-init encoder."""
import math

import numpy as np
import pytest
import torch

from conftest import make_cfg
from selfsup.data.prepared import Data, Split
from selfsup.models.features import extract_features
from selfsup.core.io import InputError
from selfsup.cluster.kmeans import topk_centroids
from selfsup.eval.knn import knn_eval
from selfsup.engine.contract import TrainContext
from selfsup.methods.mlcd import ASSIGNMENT, read_assignment
from selfsup.losses.mlcd import (apply_margin, cosine_logits, multilabel_loss, positive_columns, sample_centres,
                               soft_label_loss, soft_targets)
from selfsup.engine.loop import build_method, pretrain, save_backbone

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- assignment
def test_topl_assignment_equals_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    c = rng.normal(size=(40, 16)).astype(np.float32) * rng.uniform(0.5, 3, size=(40, 1)).astype(np.float32)
    ids, sims = topk_centroids(x, c, 5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    s = xn.astype(np.float64) @ cn.T.astype(np.float64)  # (300, 40)
    for i in range(len(x)):
        want = sorted(range(40), key=lambda j: -s[i, j])[:5]  # brute force, one image at a time
        assert list(ids[i]) == want
        np.testing.assert_allclose(sims[i], s[i, want], atol=1e-5)
    # on unit vectors the top-l by cosine are the top-l nearest by L2
    d = ((xn[:, None, :] - cn[None]) ** 2).sum(-1)
    assert (np.sort(np.argsort(d, 1)[:, :5], 1) == np.sort(ids, 1)).all()
    with pytest.raises(ValueError):
        topk_centroids(x, c, 41)


# --------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.37, 0.5, 1.0])
def test_negative_sampling_keeps_every_positive_and_the_fraction(ratio):
    g = torch.Generator().manual_seed(1)
    n_centres = 500
    seen = torch.zeros(n_centres)
    for _ in range(20):
        pos = torch.randint(0, n_centres, (16, 8), generator=g)
        index = sample_centres(pos, n_centres, ratio, generator=g)
        assert (index[1:] > index[:-1]).all()  # sorted, distinct
        assert torch.isin(pos.unique(), index).all()  # every positive kept
        n_pos = pos.unique().numel()
        expected = n_centres if ratio >= 1 else n_pos + round(ratio * (n_centres - n_pos))
        assert index.numel() == expected
        negs = index[~torch.isin(index, pos)]
        seen[negs] += 1
        # the columns of the positives point at them
        assert (index[positive_columns(index, pos)] == pos).all()
    if 0 < ratio < 1:  # negatives are random: many different centres get drawn over the steps
        assert (seen > 0).sum() > min(n_centres, 20 * ratio * n_centres) * 0.5


# --------------------------------------------------------------------------- loss
def slow_mlcd(emb, centres, pos, index, s, m, margin_type):
    """The paper's loss, one image at a time, from the formula (sec. 3.2)."""
    total = 0.0
    for b in range(emb.shape[0]):
        f = emb[b] / emb[b].norm()
        P = set(pos[b].tolist())
        neg_sum, pos_sum = 0.0, 0.0
        for c in index.tolist():
            w = centres[c] / centres[c].norm()
            cos = float(f @ w)
            if c in P:
                theta = math.acos(max(-1.0, min(1.0, cos)))
                logit = math.cos(min(theta + m, math.pi)) if margin_type == "arc" else cos - m
                pos_sum += math.exp(-s * logit)
            else:
                neg_sum += math.exp(s * cos)
        total += math.log(1.0 + neg_sum) + math.log(1.0 + pos_sum)
    return total / emb.shape[0]


def slow_soft(emb, centres, pos, sims, index, s, t):
    total = 0.0
    for b in range(emb.shape[0]):
        f = emb[b] / emb[b].norm()
        logits = {c: s * float(f @ (centres[c] / centres[c].norm())) for c in index.tolist()}
        lse = math.log(sum(math.exp(v) for v in logits.values()))
        ws = [math.exp(v / t) for v in sims[b].tolist()]
        total += -sum(w / sum(ws) * (logits[c] - lse) for w, c in zip(ws, pos[b].tolist()))
    return total / emb.shape[0]


def tiny_case(dtype=torch.float64, seed=0, b=4, n_centres=12, d=6, l=3):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, d, generator=g, dtype=dtype)
    centres = torch.randn(n_centres, d, generator=g, dtype=dtype)
    pos = torch.stack([torch.randperm(n_centres, generator=g)[:l] for _ in range(b)])
    return emb, centres, pos, g


@pytest.mark.parametrize("margin_type, m, s", [("arc", 0.3, 64.0), ("arc", 0.2, 16.0), ("cosine", 0.35, 30.0),
                                               ("arc", 0.0, 8.0)])
def test_loss_equals_the_slow_reference(margin_type, m, s):
    emb, centres, pos, g = tiny_case()
    for ratio in (1.0, 0.5):
        index = sample_centres(pos, len(centres), ratio, generator=g)
        cos = cosine_logits(emb, centres, index)
        fast = multilabel_loss(cos, positive_columns(index, pos), s, m, margin_type).mean().item()
        assert fast == pytest.approx(slow_mlcd(emb, centres, pos, index, s, m, margin_type), rel=1e-9)


def test_soft_variant_equals_its_reference():
    emb, centres, pos, g = tiny_case()
    sims = torch.rand(pos.shape, generator=g, dtype=torch.float64)
    w = soft_targets(sims, 0.1)
    assert torch.allclose(w.sum(1), torch.ones(len(w), dtype=w.dtype))
    index = sample_centres(pos, len(centres), 0.5, generator=g)
    fast = soft_label_loss(cosine_logits(emb, centres, index), positive_columns(index, pos), w, 16.0).mean().item()
    assert fast == pytest.approx(slow_soft(emb, centres, pos, sims, index, 16.0, 0.1), rel=1e-9)


@pytest.mark.parametrize("margin_type", ["arc", "cosine"])
def test_loss_gradient_matches_gradcheck(margin_type):
    emb, centres, pos, g = tiny_case(seed=3)
    index = sample_centres(pos, len(centres), 0.6, generator=g)
    pcol = positive_columns(index, pos)
    emb.requires_grad_(True)
    centres.requires_grad_(True)

    def f(e, c):
        return multilabel_loss(cosine_logits(e, c, index), pcol, 4.0, 0.3, margin_type).mean()

    assert torch.autograd.gradcheck(f, (emb, centres), eps=1e-6, atol=1e-6)
    w = soft_targets(torch.rand(pos.shape, generator=g, dtype=torch.float64), 0.2)
    assert torch.autograd.gradcheck(
        lambda e, c: soft_label_loss(cosine_logits(e, c, index), pcol, w, 4.0).mean(), (emb, centres), eps=1e-6,
        atol=1e-6)


def test_margin_makes_positives_harder():
    cos = torch.linspace(-0.9, 0.99, 50, dtype=torch.float64)
    for mt in ("arc", "cosine"):
        assert (apply_margin(cos, 0.3, mt) < cos).all()
        assert (torch.diff(apply_margin(cos, 0.3, mt)) > 0).all()  # still monotone


# --------------------------------------------------------------------------- the method
def small(digits, n=400):
    tr = Split(digits.train.x[:n], digits.train.y[:n])
    return Data(tr, digits.test, {**digits.meta, "n_train": n})


MLCD_SMALL = {"epochs": 2, "batch_size": 32, "lr": 0.1, "crop_scale": [0.5, 1.0], "centres": 40, "positives": 4,
              "scale": 16.0, "margin": 0.2, "negative_ratio": 0.5}


def test_resume_reloads_the_assignment_and_matches_an_uninterrupted_run(digits, tmp_path):
    data = small(digits)
    cfg = make_cfg(methods={"mlcd": "data/dataset"}, mlcd=MLCD_SMALL)
    full, hist_full = pretrain(cfg, "mlcd", data, tmp_path / "a" / "ck.pt")
    ids, sims, _ = read_assignment(tmp_path / "a" / ASSIGNMENT)
    assert ids.shape == (400, 4) and (np.diff(sims, axis=1) <= 1e-6).all()

    class Stop(Exception):
        pass

    def stop_after_1(epoch, rec):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        pretrain(cfg, "mlcd", data, tmp_path / "b" / "ck.pt", on_epoch_end=stop_after_1)
    ran = []
    resumed, hist = pretrain(cfg, "mlcd", data, tmp_path / "b" / "ck.pt", on_epoch_end=lambda e, r: ran.append(e))
    assert [h["epoch"] for h in hist] == [1, 2] and ran == [2]  # resumed, not restarted
    for k, v in full.backbone.state_dict().items():
        assert torch.equal(v, resumed.backbone.state_dict()[k]), k
    assert torch.equal(full.centres, resumed.centres)

    # a different assignment file under the checkpoint is refused, with the path named
    from selfsup.methods.mlcd import write_assignment
    import selfsup.core.io as sio

    ck = sio.load_torch(tmp_path / "b" / "ck.pt")
    ck["epoch"], ck["history"] = 1, ck["history"][:1]
    sio.save_torch(tmp_path / "b" / "ck.pt", ck)
    write_assignment(tmp_path / "b" / ASSIGNMENT, ids[:, ::-1].copy(), sims, 0, "other")
    with pytest.raises(InputError, match=ASSIGNMENT):
        pretrain(cfg, "mlcd", data, tmp_path / "b" / "ck.pt")


def test_upstream_file_clusters_that_encoder(digits, tmp_path):
    data = small(digits)
    # the random method's saved encoder = the seeded init MLCD clusters with no upstream
    rcfg = make_cfg(methods=["random"])
    rand, _ = pretrain(rcfg, "random", data, tmp_path / "r.pt")
    save_backbone(tmp_path / "random.pt", rand, rcfg, data.meta)
    out = {}
    for up in ("data/dataset", str(tmp_path / "random.pt")):
        cfg = make_cfg(methods={"mlcd": up}, mlcd=MLCD_SMALL)
        m = build_method(cfg, "mlcd", data)
        ctx = TrainContext(data=data, device=CPU, seed=0, upstream=cfg.upstream("mlcd") and
                           __import__("pathlib").Path(up), work_dir=tmp_path / up.replace("/", "_"))
        m.on_epoch_start(0, ctx)
        out[up] = m.pos.clone()
    assert torch.equal(*out.values())
    # a file that is not a backbone of ours fails with the file named
    torch.save({"weights": torch.zeros(3)}, tmp_path / "junk.pt")
    cfg = make_cfg(methods={"mlcd": str(tmp_path / "junk.pt")}, mlcd=MLCD_SMALL)
    with pytest.raises(InputError, match="junk.pt"):
        pretrain(cfg, "mlcd", data, tmp_path / "j" / "ck.pt")


def knn_top1(backbone, data):
    tr = extract_features(backbone, data.train, data.meta, CPU)
    te = extract_features(backbone, data.test, data.meta, CPU)
    return knn_eval(tr, data.train.y, te, data.test.y, 200, 0.07, 10)["top1"]


def test_mlcd_epochs_on_digits_beat_random_init(digits, tmp_path):
    # no upstream: MLCD clusters the random-init encoder itself; centres start at its k-means
    # centroids (centre_init kmeans), so 3 epochs suffice (the default random centres need ~8)
    cfg = make_cfg(methods={"mlcd": "data/dataset", "random": "data/dataset"}, mlcd={
        **MLCD_SMALL, "epochs": 3, "centres": 100, "positives": 8, "negative_ratio": 0.1, "centre_init": "kmeans"})
    m, hist = pretrain(cfg, "mlcd", digits, tmp_path / "m" / "ck.pt")
    rand, _ = pretrain(cfg, "random", digits, tmp_path / "r.pt")
    assert hist[-1]["loss"] < 0.95 * hist[0]["loss"]
    assert hist[-1]["pos_in_topl"] > hist[0]["pos_in_topl"] + 0.15
    assert hist[0]["nmi_labels"] > 0.3 and "nmi_labels" not in hist[1]  # clustered once (paper)
    r, s = knn_top1(rand.backbone, digits), knn_top1(m.backbone, digits)
    assert s > r + 3.0, (s, r)


def test_positive_label_purity_equals_a_loop():
    from selfsup.methods.mlcd import positive_label_purity

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 15, size=(200, 3))
    y = rng.integers(0, 4, size=200)
    maj = np.full(15, -1)
    for c in range(15):
        lab = y[ids[:, 0] == c]
        if len(lab):
            maj[c] = np.bincount(lab).argmax()  # ties: the smaller label, as the sparse version
    assert positive_label_purity(ids, y, 15) == pytest.approx(float((maj[ids] == y[:, None]).mean()))


def test_soft_loss_and_reclustering_run(digits, tmp_path):
    data = small(digits, 300)
    cfg = make_cfg(methods={"mlcd": "data/dataset"}, mlcd={
        **MLCD_SMALL, "centres": 30, "loss": "soft", "recluster_every": 1, "margin_type": "cosine"})
    m, hist = pretrain(cfg, "mlcd", data, tmp_path / "ck.pt")
    assert all(np.isfinite(h["loss"]) for h in hist)
    assert "nmi_labels" in hist[0] and "nmi_labels" in hist[1]  # re-clustered at epoch 2
    assert m.clustered_at == 1
    _, _, digest = read_assignment(tmp_path / ASSIGNMENT)
    assert digest == m.digest

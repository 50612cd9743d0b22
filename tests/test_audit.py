"""Fixes from the line-by-line comparison with the official code (issue 12's numbered list), each
with a test that fails on the code before the fix."""
import numpy as np
import pytest
import torch

from conftest import make_cfg
from selfsup.data.prepared import Data, Split
from selfsup.data.batches import batch_maker
from selfsup.engine.loop import build_method, pretrain


def synthetic(n, size, channels=3, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    y = rng.integers(0, classes, n).astype(np.int64)
    meta = {"name": "synthetic", "classes": [str(i) for i in range(classes)], "n_train": n, "n_test": 0,
            "image_size": [size, size], "channels": channels, "mean": [0.5] * channels, "std": [0.29] * channels}
    return Data(Split(x, y), Split(x[:0], y[:0]), meta)


# ----------------------------------------------------------------- 1. AlexNet-BN, Sobel, several heads
@pytest.mark.parametrize("name,over,sobel", [
    ("sela", {"heads": 3, "clusters": 4}, False),  # the shared features feed 3 heads: no in-place ReLU
    ("deepcluster", {"k": 4, "pca_dim": 4}, True),  # DeepCluster's own setting: AlexNet-BN + Sobel
])
def test_clustering_methods_train_on_alexnet_bn(tmp_path, name, over, sobel):
    data = synthetic(24, 64)
    cfg = make_cfg(methods=[name], model={"backbone": "alexnet_bn"},
                   **{name: {"epochs": 1, "batch_size": 8, "relabel_times": 1, "sobel": sobel, **over}
                      if name == "sela" else {"epochs": 1, "batch_size": 8, "sobel": sobel, **over}})
    m, hist = pretrain(cfg, name, data, tmp_path / "ck.pt")
    assert len(hist) == 1 and np.isfinite(hist[0]["loss"])
    assert (m.backbone.sobel is not None) == sobel


def test_sobel_is_per_method(tmp_path):
    """DeepCluster's code runs Sobel, SeLa's does not: one global switch cannot express both."""
    from selfsup.core.config import ConfigError, load_config
    from selfsup.models.backbones import load_backbone, save_backbone

    cfg = make_cfg(methods=["deepcluster", "sela"], deepcluster={"sobel": True, "k": 4, "pca_dim": 4},
                   sela={"sobel": False, "clusters": 4})
    data = synthetic(16, 8, 1)
    dc, se = build_method(cfg, "deepcluster", data), build_method(cfg, "sela", data)
    assert dc.backbone.sobel is not None and se.backbone.sobel is None
    save_backbone(tmp_path / "dc.pt", dc, cfg, data.meta)
    assert load_backbone(tmp_path / "dc.pt", torch.device("cpu")).sobel is not None
    with pytest.raises(ConfigError, match="model.sobel"):
        load_config({"methods": ["deepcluster"], "model": {"sobel": True}})


# ----------------------------------------------------------------- 2. re-labelling and storage order
def test_sela_relabels_from_shuffled_batches(digits, tmp_path):
    """The official code re-labels from the shuffled training loader. Stored class by class, batches
    taken in storage order are one class each, and batch norm (train mode) removes the class signal
    the labels are computed from; shuffled, the labels carry it whatever the storage order."""
    from selfsup.engine.contract import TrainContext
    from selfsup.cluster.metrics import nmi

    sup, _ = pretrain(make_cfg(supervised={"epochs": 2}), "supervised", digits, tmp_path / "s.pt")
    order = np.argsort(digits.train.y, kind="stable")  # class by class
    by_class = Data(Split(np.asarray(digits.train.x)[order], digits.train.y[order]), digits.test,
                    {**digits.meta})
    cfg = make_cfg(methods=["sela"], sela={"epochs": 1, "heads": 1, "clusters": 10, "relabel_times": 1,
                                           "crop_scale": [1.0, 1.0]})
    nmis = []
    for data in (digits, by_class):
        m = build_method(cfg, "sela", data)
        m.backbone.load_state_dict(sup.backbone.state_dict())
        ctx = TrainContext(data=data, device=torch.device("cpu"), seed=0, extract_batch_size=64,
                           make_batches=batch_maker(cfg, data, torch.device("cpu")))
        m.on_epoch_start(0, ctx)
        nmis.append(nmi(data.train.y, m.labels[0].numpy()))
    assert nmis[1] > 0.8 * nmis[0] and nmis[0] > 0.3, nmis


# ----------------------------------------------------------------- 3. SeLa's heads
def test_sela_heads_start_as_the_official_code():
    m = build_method(make_cfg(methods=["sela"], sela={"heads": 2, "clusters": 30}), "sela", synthetic(40, 8, 1))
    for h in m.heads:
        w = h[-1].weight
        assert torch.all(h[-1].bias == 0) and abs(float(w.detach().std()) - 0.01) < 0.002


# ----------------------------------------------------------------- 6. InstDisc follows the run seed
def test_instdisc_bank_and_noise_follow_the_run_seed(tmp_path):
    data = synthetic(64, 8, 1)

    def run(seed):
        cfg = make_cfg(methods=["instdisc"], seed=seed, instdisc={"epochs": 1, "batch_size": 16, "nce_m": 8})
        bank0 = build_method(cfg, "instdisc", data).bank.memory.clone()
        m, _ = pretrain(cfg, "instdisc", data, tmp_path / f"s{seed}" / "ck.pt")
        return bank0, m.bank.memory

    a0, a = run(0)
    b0, b = run(1)
    c0, c = run(0)
    assert torch.equal(a0, c0) and torch.equal(a, c)  # reproducible
    assert not torch.equal(a0, b0) and not torch.equal(a, b)  # but the run seed's own


# ----------------------------------------------------------------- 8. rank-deficient features
def test_rank_deficient_features_whiten_with_a_floor_instead_of_stopping():
    from selfsup.cluster.pca import PCAWhitening

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)) @ rng.normal(size=(3, 16))  # rank 3 in 16-d
    x = x.astype(np.float32)
    assert PCAWhitening.fit(x, 8).dim == 3  # no floor: capped at the numerical rank (tests/test_numeric.py)
    y = PCAWhitening.fit(x, 8, eig_floor=1e-6).transform(x)
    assert y.shape == (200, 8)  # with a floor every axis is kept
    assert np.isfinite(y).all() and np.allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-4)
    full = rng.normal(size=(200, 16)).astype(np.float32)  # full rank: the floor changes nothing
    np.testing.assert_array_equal(PCAWhitening.fit(full, 8).transform(full),
                                  PCAWhitening.fit(full, 8, eig_floor=1e-6).transform(full))
    assert make_cfg().method("deepcluster").pca_eig_floor == 1e-6


# ----------------------------------------------------------------- 9. MLCD
def test_mlcd_margin_gradient_is_straight_through_as_unicom():
    from selfsup.losses.mlcd import apply_margin

    cos = torch.tensor([0.3, 0.7, -0.2], requires_grad=True)
    st = apply_margin(cos, 0.3, "arc", "straight_through")
    ex = apply_margin(cos, 0.3, "arc", "exact")
    assert torch.allclose(st, ex)  # the same forward value, cos(theta + m)
    st.sum().backward()
    assert torch.equal(cos.grad, torch.ones(3))  # the gradient of the plain cosine
    assert make_cfg(methods=["mlcd"]).method("mlcd").margin_grad == "straight_through"


def test_mlcd_refuses_kmeans_centres_from_another_encoder(digits, tmp_path):
    from selfsup.core.config import ConfigError
    from selfsup.engine.loop import save_backbone

    rcfg = make_cfg(methods=["random"])
    rand, _ = pretrain(rcfg, "random", digits, tmp_path / "r.pt")
    save_backbone(tmp_path / "up.pt", rand, rcfg, digits.meta)
    cfg = make_cfg(methods={"mlcd": str(tmp_path / "up.pt")},
                   mlcd={"epochs": 1, "centres": 20, "positives": 4, "centre_init": "kmeans"})
    with pytest.raises(ConfigError, match="upstream encoder's feature space"):
        pretrain(cfg, "mlcd", digits, tmp_path / "m" / "ck.pt")


# ----------------------------------------------------------------- 7. the CIFAR-stem ResNet-50
def test_resnet50_cifar_keeps_32px_resolution():
    from selfsup.models.backbones import build_backbone

    net = build_backbone("resnet50_cifar", 3, image_size=32)
    assert net.out_dim == 2048 and net.trunk.conv1.stride == (1, 1)
    assert isinstance(net.trunk.maxpool, torch.nn.Identity)


# ----------------------------------------------------------------- 4. the paper kNN: head features, training T
@pytest.mark.parametrize("name,over", [
    ("instdisc", {"temperature": 0.3, "nce_m": 16}),
    ("moco", {"temperature": 0.15, "queue_size": 32, "batch_size": 32}),
    ("invaspread", {"temperature": 0.2, "batch_size": 32}),
])
def test_paper_knn_reads_the_saved_head_at_the_training_temperature(digits, tmp_path, name, over):
    """InstDisc, InvaSpread and the MoCo CIFAR demo run their kNN on the L2-normalised 128-d head
    output at the training temperature: the encoder file carries the head and the temperature, so a
    sweep of <m>.temperature moves the protocol's T with it."""
    from selfsup.eval.protocols import knn_protocols, paper_protocol
    from selfsup.models.features import apply_head, extract_features
    from selfsup.models.backbones import load_backbone, load_eval_head, save_backbone

    cfg = make_cfg(methods=[name], **{name: {"epochs": 1, **over}})
    m, _ = pretrain(cfg, name, digits, tmp_path / "ck.pt")
    save_backbone(tmp_path / "m.pt", m, cfg, digits.meta)
    cpu = torch.device("cpu")
    head, t = load_eval_head(tmp_path / "m.pt", cpu)
    assert t == over["temperature"] and head.spec["l2"] and head.spec["proj"]["out_dim"] == 128
    net = load_backbone(tmp_path / "m.pt", cpu)
    tr = extract_features(net, digits.train, digits.meta, cpu)
    htr = apply_head(head, tr, cpu)
    m.eval()
    with torch.no_grad():  # the saved head reproduces the trained model's normalised embedding
        x = torch.from_numpy(tr[:64])
        ref = torch.nn.functional.normalize(m.head(x), dim=1).numpy()
    np.testing.assert_allclose(htr[:64], ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(htr, axis=1), 1.0, atol=1e-5)
    spec = paper_protocol(f"knn.paper.{name}", 200, 0.0, "head", {"head": head.spec, "temperature": t})
    assert spec["temperature"] == over["temperature"] and "128-d + L2" in spec["where"]
    te = extract_features(net, digits.test, digits.meta, cpu)
    spec["features"] = (htr, digits.train.y, apply_head(head, te, cpu), digits.test.y)
    out = knn_protocols(tr, digits.train.y, te, digits.test.y, [200], 0.07, 10, paper=spec)
    assert out["paper_protocol"].endswith(f"T={over['temperature']:g} on {spec['where']}")
    assert out["paper_top1"] != out["top1"]  # other features: another number


def test_paper_knn_refuses_head_features_a_method_does_not_save():
    from selfsup.core.config import ConfigError
    from selfsup.eval.protocols import paper_protocol

    with pytest.raises(ConfigError, match="knn.paper.deepcluster.features"):
        paper_protocol("knn.paper.deepcluster", 10, 0.1, "head", {"head": None, "temperature": None})
    with pytest.raises(ConfigError, match="knn.paper.deepcluster.temperature"):
        paper_protocol("knn.paper.deepcluster", 10, 0.0, "backbone", {"head": None, "temperature": None})


def test_sela_paper_features_are_post_relu_fc7(tmp_path):
    from selfsup.models.backbones import load_eval_head, save_backbone

    cfg = make_cfg(methods=["sela"], model={"backbone": "alexnet_bn"}, sela={"heads": 2, "clusters": 4})
    m = build_method(cfg, "sela", synthetic(8, 64))
    save_backbone(tmp_path / "m.pt", m, cfg, synthetic(8, 64).meta)
    head, t = load_eval_head(tmp_path / "m.pt", torch.device("cpu"))
    x = torch.randn(5, 4096)
    assert t is None and torch.equal(head(x), torch.relu(x))


def test_sela_final_knn_on_pca_128_features():
    """SeLa's final kNN number: PCA to 128 dims (fitted on the training features) before the kNN."""
    import faiss

    from selfsup.eval.protocols import knn_protocols, paper_protocol
    from selfsup.eval.knn import knn_eval

    rng = np.random.default_rng(0)
    tr, te = rng.normal(size=(300, 40)).astype(np.float32), rng.normal(size=(60, 40)).astype(np.float32)
    ytr, yte = rng.integers(0, 5, 300), rng.integers(0, 5, 60)
    tr[:, :3] += 3 * np.eye(5)[ytr][:, :3]  # a class signal in a few axes
    spec = paper_protocol("knn.paper.sela", 10, 0.1, "backbone", {"head": None}, pca_dim=8)
    out = knn_protocols(tr, ytr, te, yte, [20], 0.07, 5, paper=spec)
    pca = faiss.PCAMatrix(40, 8, 0.0)
    pca.train(tr)
    ref = knn_eval(pca.apply(tr), ytr, pca.apply(te), yte, 10, 0.1, 5)["top1"]
    assert out["paper_top1"] == ref and out["paper_protocol"].endswith("on backbone + PCA-8")
    assert out["paper_top1"] != knn_protocols(tr, ytr, te, yte, [20], 0.07, 5,
                                              paper={**spec, "pca_dim": 0})["paper_top1"]


def test_simclr_v2_head_is_three_layers_and_its_saved_head_rebuilds(digits, tmp_path):
    """SimCLR v2's deeper projection head (head_layers 3: Linear-BN-ReLU twice, then Linear) trains,
    and the eval head saved with the encoder rebuilds it with the same outputs; 1 layer fails naming
    the key."""
    from selfsup.core.config import ConfigError
    from selfsup.models.backbones import load_eval_head, save_backbone

    cfg = make_cfg(methods=["simclr"], simclr={"epochs": 1, "warmup_epochs": 0, "head_layers": 3, "batch_size": 64})
    m, hist = pretrain(cfg, "simclr", digits, tmp_path / "ck.pt")
    assert np.isfinite(hist[-1]["loss"])
    linears = [x for x in m.head if isinstance(x, torch.nn.Linear)]
    assert len(linears) == 3 and sum(isinstance(x, torch.nn.BatchNorm1d) for x in m.head) == 2
    save_backbone(tmp_path / "m.pt", m, cfg, digits.meta)
    head, _ = load_eval_head(tmp_path / "m.pt", torch.device("cpu"))
    assert head.spec["proj"]["layers"] == 3
    m.eval()
    x = torch.randn(16, m.backbone.out_dim)
    with torch.no_grad():
        np.testing.assert_allclose(head(x).numpy(), torch.nn.functional.normalize(m.head(x), dim=1).numpy(),
                                   atol=1e-5)
    with pytest.raises(ConfigError, match="simclr.head_layers"):
        make_cfg(methods=["simclr"], simclr={"epochs": 1, "warmup_epochs": 0, "head_layers": 1})

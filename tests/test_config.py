"""Bad input fails before any work, with a message naming the key or the file."""
import json

import numpy as np
import pytest

from conftest import ROOT, make_cfg
from selfsup.core.config import ConfigError, load_config
from selfsup.data.prepared import load_prepared
from selfsup.core.io import InputError, read_features, write_features
from selfsup.engine.loop import build_method


def test_shipped_params_parse():
    cfg = load_config(ROOT / "params.yaml")
    assert {"deepcluster", "random", "supervised"} <= set(cfg.methods)
    assert cfg.method("deepcluster").k > 0
    assert cfg.upstream("deepcluster") is None


def test_methods_list_shorthand_means_no_upstream():
    cfg = make_cfg(methods=["deepcluster", "random"])
    assert cfg.methods == {"deepcluster": "data/dataset", "random": "data/dataset"}
    assert list(cfg.methods) == ["deepcluster", "random"]  # report order kept


@pytest.mark.parametrize("over, key", [
    ({"dataset": {"name": "mnist"}}, "dataset.name"),
    ({"model": {"backbone": "vgg"}}, "model.backbone"),
    ({"methods": ["deepcluster", "no_such_method"]}, "methods"),
    ({"deepcluster": {"epochs": 0}}, "deepcluster.epochs"),
    ({"deepcluster": {"lr": -0.1}}, "deepcluster.lr"),
    ({"supervised": {"lr": 0}}, "supervised.lr"),
    ({"deepcluster": {"kk": 3}}, "deepcluster.kk"),
    ({"deepcluster": {"k": "many"}}, "deepcluster.k"),
    ({"knn": {"k": [200, -1]}}, "knn.k"),
    ({"linear": {"epochs": 0}}, "linear.epochs"),
    ({"colour": 1}, "colour"),
    ({"dataset": {"name": "imagefolder"}}, "dataset.path"),
    ({"methods": {"deepcluster": "data/models/supervised.pt"}}, "methods.deepcluster"),  # reads no upstream
    ({"methods": {"deepcluster": ""}}, "methods.deepcluster"),
    ({"methods": ["random", "random"]}, "methods"),
    ({"deepcluster": {"lr_schedule": "poly"}}, "deepcluster.lr_schedule"),
    ({"deepcluster": {"lr_steps": [5, 2]}}, "deepcluster.lr_steps"),
    ({"deepcluster": {"epochs": 3, "warmup_epochs": 3}}, "deepcluster.warmup_epochs"),
    ({"knn": {"paper": {"sela": {"k": 0}}}}, "knn.paper.sela.k"),
])
def test_bad_values_name_the_key(over, key):
    with pytest.raises(ConfigError) as e:
        make_cfg(**over)
    assert str(e.value).startswith(key), str(e.value)


def test_data_dependent_checks_fail_before_work(digits):
    with pytest.raises(ConfigError, match=r"deepcluster\.k: 5000 clusters but only 1437"):
        build_method(make_cfg(deepcluster={"k": 5000}), "deepcluster", digits)
    with pytest.raises(ConfigError, match=r"deepcluster\.pca_dim: 256 is larger than the feature dimension 128"):
        build_method(make_cfg(deepcluster={"pca_dim": 256}), "deepcluster", digits)
    with pytest.raises(ConfigError, match=r"model\.backbone: alexnet_bn needs images of at least 63"):
        build_method(make_cfg(model={"backbone": "alexnet_bn"}), "deepcluster", digits)


def test_missing_and_corrupt_inputs_name_the_file(tmp_path, digits):
    with pytest.raises(InputError, match="meta.json"):
        load_prepared(tmp_path / "nowhere")
    d = tmp_path / "ds"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"n_train": 3, "n_test": 1}))
    for name in ("train_x", "train_y", "test_x", "test_y"):
        (d / f"{name}.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="train_x.npy"):
        load_prepared(d)
    f = tmp_path / "f.parquet"
    write_features(f, np.ones((4, 3), np.float32), np.arange(4))
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(InputError, match="f.parquet"):
        read_features(f)


def test_training_order_puts_a_method_after_the_encoder_it_reads():
    """The pretrain stage trains every method in one process: MLCD, listed first, still trains after
    DeepCluster, whose encoder it clusters; the rest keep the report order."""
    cfg = make_cfg(methods={"mlcd": "data/models/deepcluster.pt", "random": "data/dataset",
                            "deepcluster": "data/dataset"})
    assert list(cfg.methods) == ["mlcd", "random", "deepcluster"]
    assert cfg.training_order() == ["deepcluster", "mlcd", "random"]
    assert cfg.trained_upstream("mlcd") == "deepcluster" and cfg.trained_upstream("random") is None
    # a local weights file is no method of the stage
    assert make_cfg(methods={"mlcd": "weights/clip.pt"}).trained_upstream("mlcd") is None


def test_an_upstream_cycle_fails_naming_methods():
    with pytest.raises(ConfigError, match=r"methods: .*cycle \(mlcd -> mlcd\)"):
        make_cfg(methods={"mlcd": "data/models/mlcd.pt"})

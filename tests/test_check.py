"""The check stage (stages/check.py, selfsup.data.preflight): params.yaml read whole and checked against the
machine before any stage runs, numbers in YAML 1.1 and 1.2 spellings, and a bad key reported as one line.
End to end under DVC (a bad param deletes nothing, a sweep's `1e-06` parses): tests/test_pipeline.py."""
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from selfsup.core.config import ConfigError, load_config, load_yaml
from selfsup.data.preflight import check_device, preflight


@pytest.mark.parametrize("text, value", [("1e-6", 1e-6), ("1e-06", 1e-6), ("1.0e-6", 1e-6), ("1.0e+12", 1e12),
                                         ("1e12", 1e12), ("1E3", 1e3), ("+2.5e-3", 2.5e-3), ("0.5", 0.5), (".5e1", 5.0)])
def test_yaml_11_and_12_number_spellings_are_numbers(tmp_path, text, value):
    params = tmp_path / "params.yaml"
    params.write_text(f"methods: [moco]\nmoco:\n  weight_decay: {text}\n  lr: {text}\ncheckpoint_minutes: {text}\n")
    cfg = load_config(params)
    assert cfg.method("moco").weight_decay == value and cfg.method("moco").lr == value
    assert cfg.checkpoint_minutes == value


def test_the_loader_leaves_integers_and_strings_alone():
    d = load_yaml("a: 10\nb: '1e-6'\nc: 1e\nd: e5\ne: 0x10\nf: 1.5\n")
    assert d == {"a": 10, "b": "1e-6", "c": "1e", "d": "e5", "e": 16, "f": 1.5}
    assert isinstance(d["a"], int)


@pytest.mark.parametrize("over, message", [
    ({"checkpoint_minute": 5}, "checkpoint_minute: unknown key; did you mean 'checkpoint_minutes'?"),
    ({"mocco": {}}, "mocco: unknown key; did you mean 'moco'?"),
    ({"moco": {"weight_decy": 1e-4}}, "moco.weight_decy: unknown key; did you mean 'weight_decay'?"),
    ({"whiten": {"pca_dims": 8}}, "whiten.pca_dims: unknown key; did you mean 'pca_dim'?"),
])
def test_a_typo_is_an_error_with_the_closest_key(over, message):
    raw = load_yaml((ROOT / "params.yaml").read_text())
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(raw.get(k), dict):
            raw[k].update(v)
        else:
            raw[k] = v
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    assert str(e.value).startswith(message), str(e.value)


def test_preflight_checks_the_dataset_path_and_the_device(tmp_path):
    cfg = load_config({"methods": ["random"], "dataset": {"name": "imagefolder", "path": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match=r"dataset.path: .*nope does not exist"):
        preflight(cfg)
    (tmp_path / "file.txt").write_text("x")
    cfg = load_config({"methods": ["random"], "dataset": {"name": "imagefolder", "path": str(tmp_path / "file.txt")}})
    with pytest.raises(ConfigError, match="is a file but not a tar archive"):
        preflight(cfg)
    cfg = load_config({"methods": ["random"], "dataset": {"name": "imagenet", "path": str(tmp_path / "file.txt")}})
    with pytest.raises(ConfigError, match="is not a folder"):
        preflight(cfg)
    preflight(load_config({"methods": ["random"], "device": "cpu"}))  # the embedded digits: nothing to check
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=r"device: 'cuda:%d'" % (n + 7)):
        check_device(f"cuda:{n + 7}")
    check_device("cpu")
    check_device("auto")


def _check_stage(tmp_path, params):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "stages" / "check.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_check_stage_prints_a_bad_key_as_one_line_and_writes_nothing(tmp_path):
    params = load_yaml((ROOT / "params.yaml").read_text())
    params["deepcluster"]["k"] = -5
    r = _check_stage(tmp_path, params)
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip() == "params: deepcluster.k: must be > 0, got -5", r.stderr[-2000:]
    assert not (tmp_path / "data" / "params.checked").exists()
    params["deepcluster"]["k"] = 5
    r = _check_stage(tmp_path, params)
    assert r.returncode == 0, r.stderr[-2000:]
    first = (tmp_path / "data" / "params.checked").read_bytes()
    params["moco"]["lr"] = 0.5  # another valid edit: the output (every stage's dep) is unchanged
    shutil.rmtree(tmp_path / "data")
    assert _check_stage(tmp_path, params).returncode == 0
    assert (tmp_path / "data" / "params.checked").read_bytes() == first

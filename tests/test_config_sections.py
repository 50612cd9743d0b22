"""Config sections beside their code, typed when first read (``selfsup.core.config.SECTIONS``)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selfsup.core.config import SECTIONS, ConfigError, load_config, section_class, section_file
from selfsup.dag import section_deps

ROOT = Path(__file__).resolve().parents[1]


def test_each_schema_sits_in_the_layer_that_reads_it():
    """Every section names an existing class in the file ``section_file`` gives, and no schema is left in
    the config engine."""
    for name in SECTIONS:
        cls = section_class(name)
        assert (ROOT / section_file(name)).is_file()
        assert cls.__module__.replace(".", "/") + ".py" == section_file(name)
        assert cls.__module__ != "selfsup.core.config", name


def test_a_section_is_typed_when_first_read():
    """Loading without the method blocks imports no section schema; reading one types that one only."""
    code = ("import sys; from selfsup.core.config import load_config; "
            "c = load_config('params.yaml', parse_methods=False); "
            "before = sorted(m for m in sys.modules if m.startswith('selfsup.') and m.endswith('.config')); "
            "c.voc.enabled; "
            "after = sorted(m for m in sys.modules if m.startswith('selfsup.') and m.endswith('.config')); "
            "print(before, after)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['selfsup.core.config'] ['selfsup.core.config', 'selfsup.detection.config']"


def test_a_bad_section_key_fails_at_load_or_when_read():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["voc"] = {**raw["voc"], "stepz": 3}
    with pytest.raises(ConfigError, match=r"voc\.stepz: unknown key; did you mean 'steps'"):
        load_config(raw)  # every section typed: the check stage's call
    lazy = load_config(raw, parse_methods=False)
    assert lazy.linear.protocol == raw["linear"]["protocol"]  # another section reads fine
    with pytest.raises(ConfigError, match=r"voc\.stepz: unknown key"):
        lazy.voc  # noqa: B018 (the read types it)


def test_a_cross_section_check_runs_when_the_section_is_typed():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["finetune"] = {**raw.get("finetune", {}), "head_layers": {"nosuch": 1}}
    with pytest.raises(ConfigError, match=r"finetune\.head_layers\.nosuch: 'nosuch' is not in methods"):
        load_config(raw)


def test_replace_and_assignment_keep_the_original():
    cfg = load_config(ROOT / "params.yaml", parse_methods=False)
    voc = cfg.voc
    other = cfg.replace(seed=cfg.seed + 1, voc=type(voc)(steps=voc.steps + 1))
    assert (other.seed, other.voc.steps) == (cfg.seed + 1, voc.steps + 1)
    assert cfg.voc is voc and cfg.seed != other.seed
    assert other.to_dict()["voc"]["steps"] == voc.steps + 1
    assert [k for k in cfg.to_dict() if k in SECTIONS] == list(SECTIONS)  # params.yaml's order


def test_a_stage_depends_on_the_schema_of_each_section_it_reads():
    """dvc.yaml: a stage whose params name a section lists that section's schema file among its deps, so a
    changed default re-runs it; the check stage (every key) lists every schema."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        want = set(section_deps(list(body.get("params", []))))
        assert want <= set(body.get("deps", [])), name
    assert {section_file(s) for s in SECTIONS} <= set(stages["check"]["deps"])
    assert section_deps(["seed", "voc.steps", "linear", {"params.yaml": ["dataset.name"]}]) == sorted(
        ["selfsup/detection/config.py", "selfsup/eval/config.py", "selfsup/data/config.py"])


def test_a_copy_keeps_the_typed_sections():
    """``dataclasses.replace`` (InstDisc's Table 1 rows, presets) carries typed and raw sections alike."""
    import dataclasses

    cfg = load_config(ROOT / "params.yaml", parse_methods=False)
    voc = cfg.voc  # typed; linear stays raw
    other = dataclasses.replace(cfg, methods={"instdisc": "data/dataset"})
    assert other.voc is voc and other.linear == cfg.linear
    other.knn = dataclasses.replace(cfg.knn, k=[5])
    assert cfg.knn.k != [5]

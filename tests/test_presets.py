"""Presets (python -m selfsup.presets): the listing, every preset smoked on its stand-in, apply keeps
params.yaml's comments, and the sourced table of published numbers the reports compare with."""
import math

import pandas as pd
import pytest
import yaml

from conftest import ROOT
from selfsup import presets
from selfsup.core.config import ConfigError, load_config
from selfsup.methods import REGISTRY
from selfsup.report.results import OURS_FOR, load_paper_results, paper_columns

METHODS = ("deepcluster", "sela", "mlcd", "instdisc", "invaspread", "cpc", "cmc", "moco", "simclr", "rotnet", "jigsaw", "relloc",
           "colorization", "byol", "simsiam", "swav", "deepclusterv2", "dino", "mocov3", "mae", "beit", "random",
           "supervised")
IMAGENET = ("cmc_imagenet", "cpc_imagenet", "deepcluster_imagenet", "sela_imagenet_alexnet", "sela_imagenet_resnet50", "instdisc_imagenet",
            "moco_v2_imagenet", "simclr_imagenet", "supervised_imagenet")


def test_listing_has_a_cifar10_preset_per_method_and_the_imagenet_presets(capsys):
    rows = presets.listing()
    cifar = {m for r in rows if r["dataset"] == "cifar10" for m in r["methods"].split(", ")}
    assert set(METHODS) <= cifar
    assert set(IMAGENET) <= {r["name"] for r in rows if r["dataset"] == "imagenet"}
    assert presets.main([]) == 0
    out = capsys.readouterr().out
    assert "moco_cifar10_demo" in out and "lemniscate" in out


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_smokes(name):
    out = presets.smoke(name)
    assert set(out) == set(presets.load(name)["params"]["methods"])
    for m, r in out.items():
        # the random baselines have no schedule; colourisation skips grayscale data (the digits default)
        trains = REGISTRY[m].trains and not (m in ("colorization", "cmc") and presets.STAND_INS[presets.load(name)["dataset"]][1] == 1)
        assert r["epochs"] == (1 if trains else 0)
        assert not trains or math.isfinite(r["loss"])
        assert 0.0 <= r["linear"] <= 100.0
        assert (r["finetune"] is not None) == presets.check(name).finetune.enabled
        assert 0.0 <= r["knn"] <= 100.0


def test_smoke_keeps_the_presets_own_keys():
    p = presets.smoke_params("moco_v2_imagenet")
    assert p["moco"]["queue_size"] == presets.SMOKE_CAPS["queue_size"]  # capped: 16 images
    assert p["moco"]["m"] == 0.999 and p["moco"]["blur_p"] == 0.5 and p["model"]["backbone"] == "resnet50"
    assert p["dataset"]["crop_size"] == presets.SMOKE_SIDE and p["dataset"]["resize_size"] == 73  # 224 / 256 scaled
    assert list(p["methods"]) == ["moco"]


def test_apply_writes_the_preset_and_keeps_the_comments(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    presets.apply("moco_cifar10_demo", params, sets=["moco.epochs=3"])
    text = params.read_text()
    assert "# MoCo v2 (He et al. 2020; Chen et al. 2020)" in text  # comments kept
    cfg = load_config(params)
    assert list(cfg.methods) == ["moco"] and cfg.model.backbone == "resnet18_cifar"
    assert cfg.method("moco").crop_scale == [0.08, 1.0] and cfg.method("moco").epochs == 3
    assert cfg.knn.paper["moco"].features == "head" and list(cfg.knn.paper) == ["moco"]  # replaced, not merged
    assert cfg.report.notes[0].startswith("Preset moco_cifar10_demo: MoCo, CIFAR-10")
    diffs = presets.differences("moco_cifar10_demo")  # generated from the ledger's declared rows
    assert cfg.report.notes[1:] == ([f"Differences from the official recipe: {diffs}"] if diffs else [])
    before = params.read_text()
    with pytest.raises(ConfigError, match="moco.queue_size"):
        presets.apply("moco_cifar10_demo", params, sets=["moco.queue_size=-1"])
    assert params.read_text() == before  # a bad preset leaves the file as it was
    with pytest.raises(ConfigError, match="nope"):
        presets.load("nope")


def test_params_yaml_is_the_default_preset_written_out():
    """params.yaml is what `apply digits` writes: the template's keys and comments, the default's values."""
    assert (ROOT / "params.yaml").read_text() == presets.render(presets.DEFAULT)


@pytest.mark.parametrize("name", presets.names())
def test_a_preset_does_not_depend_on_what_was_applied_before(name, tmp_path):
    """apply B onto the default and onto another preset's params.yaml: the same file, byte for byte (comments
    kept), and the same effective config; keys a preset leaves out are the typed defaults, not the default's."""
    names = presets.names()
    other = names[(names.index(name) + 1) % len(names)]
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text((ROOT / "params.yaml").read_text())
    presets.apply(name, a)
    presets.apply(other, b)
    presets.apply(name, b)
    assert a.read_text() == b.read_text()
    assert load_config(a).to_dict() == load_config(b).to_dict()
    eff = load_config(presets.effective(name)).to_dict()
    assert load_config(a).to_dict() == eff
    if name != presets.DEFAULT:
        assert "# MoCo v2 (He et al. 2020; Chen et al. 2020)" in a.read_text()  # the template's comments


def test_the_recipe_ledger_has_no_undeclared_difference(capsys):
    """`diff --all` exits 0: every preset compares at least MIN_ROWS settings with the official recipe and
    every difference is declared; --json gives the counts."""
    import json

    assert presets.main(["diff", "--all", "--json"]) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert set(out) == set(presets.names())
    for name, c in out.items():
        assert c["undeclared"] == 0 and c["compared"] >= presets.MIN_ROWS, (name, c)
        assert c["same"] + c["declared"] == c["compared"], name


def test_the_ledger_marks_same_declared_undeclared_and_stale(tmp_path, monkeypatch, capsys):
    import shutil

    shutil.copy(presets.presets_dir() / f"{presets.DEFAULT}.yaml", tmp_path)
    (tmp_path / "toy.yaml").write_text("""title: a toy
dataset: cifar10
source: nowhere
sources: {code: owner/repo@abcdef1 train.py}
recipe:
  - {key: moco.lr, official: 0.06, source: code}
  - {key: moco.m, official: 0.99, source: code (--moco-m), declared: "a documented choice"}
  - {key: moco.epochs, official: 800, source: code}
  - {key: moco.temperature, official: 0.2, source: code, declared: "left over"}
  - {key: moco.no_such_setting, official: 1, source: code, declared: "not implemented"}
params:
  methods: {moco: data/dataset}
  moco: {lr: 0.06, m: 0.999, epochs: 200, temperature: 0.2}
""")
    monkeypatch.setattr(presets, "presets_dir", lambda: tmp_path)
    rows = {r.key: r for r in presets.ledger("toy")}
    assert [rows[k].status for k in ("moco.lr", "moco.m", "moco.epochs", "moco.temperature", "moco.no_such_setting")] \
        == ["same", "declared", "UNDECLARED", "STALE", "declared"]
    assert rows["moco.m"].source == "owner/repo@abcdef1 train.py (--moco-m)" and rows["moco.no_such_setting"].ours \
        == presets.ABSENT
    assert presets.differences("toy") == ("moco.m: ours 0.999, official 0.99 (a documented choice). moco.no_such_setting: "
                                         "ours (no such setting), official 1 (not implemented).")
    assert presets.main(["diff", "toy"]) == 1
    err = capsys.readouterr().err
    assert "moco.epochs: UNDECLARED" in err and "moco.temperature: STALE" in err and "fewer than 10" in err


def _leaves(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in presets.REPLACED:
            yield from _leaves(v, key + ".")
        else:
            yield key, v


@pytest.mark.parametrize("name", [n for n in presets.names() if n != presets.DEFAULT])
def test_a_digits_sized_value_in_a_preset_is_in_its_ledger(name):
    """A preset's setting that equals the digits default's value but not the typed default (lr 0.1, batch 32,
    wd 5e-4, blur 0 ...) is compared with the official recipe in the ledger, so no digits value rides along
    unchecked; data location, processes and the report's ids are not recipe settings."""
    digits, typed = presets.effective(presets.DEFAULT), presets.typed_defaults()
    pre = presets.load(name)
    ledger = {r["key"] for r in pre["recipe"]}
    loose = [k for k, v in _leaves(pre["params"])
             if k.split(".")[0] not in ("methods", "report", "knn", "instdisc_table1", "dataset", "dist")
             and presets.same_value(v, presets._lookup(digits, k)) and not presets.same_value(v, presets._lookup(typed, k))
             and k not in ledger]
    assert not loose, f"{name}: digits-valued settings missing from the recipe ledger: {loose}"


def test_paper_results_are_sourced_and_every_preset_id_exists():
    res = load_paper_results()
    keys = {"id", "method", "dataset", "backbone", "setting", "protocol", "layer", "metric", "value", "source",
            "where_checked", "checked", "note"}
    for pid, r in res.items():
        assert set(r) == keys, pid
        assert r["source"] and isinstance(r["checked"], bool), pid
        assert not r["checked"] or r["where_checked"], f"{pid}: checked without saying where"
        assert r["value"] is None or 0.0 < float(r["value"]) <= 100.0, pid
    for name in presets.names():
        for m, pid in presets.load(name)["params"]["report"]["paper"].items():
            assert pid in res, (name, pid)
            assert (res[pid]["protocol"], res[pid]["metric"]) in OURS_FOR, pid
            assert res[pid]["method"] == m and res[pid]["value"] is not None, pid


def test_sources_name_public_texts_only():
    """A published number's source, note and where_checked, and a preset's ledger sources, name papers and
    repositories, never how or with what a number was looked up."""
    import re

    words = re.compile(r"session|from memory|find_string|search (corpus|result)|not reachable|lecture|look-?up id",
                       re.I)
    for pid, r in load_paper_results().items():
        for k in ("source", "note", "where_checked"):
            assert not words.search(str(r[k])), (pid, k, r[k])
    for name in presets.names():
        pre = presets.load(name)
        texts = [*pre["sources"].values(), *(str(r["source"]) for r in pre["recipe"]),
                 *(str(r.get("declared", "")) for r in pre["recipe"]), pre["source"], pre["title"]]
        assert not any(words.search(t) for t in texts), name


def test_report_puts_ours_beside_the_paper():
    res = load_paper_results()
    t = pd.DataFrame({"knn200_top1": [70.0, 60.0], "knn_paper_top1": [78.0, math.nan],
                      "linear_top1": [80.0, 50.0], "voc_ap50": [math.nan] * 2, "voc_ap": [math.nan] * 2,
                      "voc_ap75": [math.nan] * 2}, index=pd.Index(["instdisc", "random"], name="method"))
    out = paper_columns(t, {"instdisc": "instdisc/cifar10/resnet18/nce4096/knn"}, "a baseline", res)
    paper = res["instdisc/cifar10/resnet18/nce4096/knn"]["value"]
    assert out.at["instdisc", "paper"] == paper and out.at["instdisc", "ours"] == 78.0
    assert out.at["instdisc", "diff"] == pytest.approx(78.0 - paper)
    assert "Table 1" in out.at["instdisc", "paper_source"]
    assert math.isnan(out.at["random", "paper"]) and out.at["random", "paper_protocol"] == "a baseline"
    with pytest.raises(Exception, match="report.paper.random"):
        paper_columns(t, {"random": "no/such/id"}, "", res)


def test_report_stage_reads_the_paper_table_as_a_dvc_dependency():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for s in ("report", "table1"):
        assert "selfsup/report/paper_results.yaml" in stages[s]["deps"], s
    assert "report" in stages["report"]["params"]


def test_a_per_layer_paper_number_meets_our_probe_of_that_layer():
    from selfsup.report.results import probes_table

    res = load_paper_results()
    pid = "deepcluster/imagenet/alexnet_bn_sobel/conv5"
    t = pd.DataFrame({"linear_top1": [50.0], "probe_conv5_top1": [33.0]},
                     index=pd.Index(["deepcluster"], name="method"))
    out = paper_columns(t, {"deepcluster": pid}, "", res)
    assert out.at["deepcluster", "ours"] == 33.0 and "conv5" in out.at["deepcluster", "paper_protocol"]
    allm = {"deepcluster": {"linear": {"probes": {"layers": {"conv1": {"top1": 10.0}, "conv5": {"top1": 33.0}}}}},
            "random": {"linear": {}}}
    pt = probes_table(allm, {"deepcluster": pid}, res)
    assert list(pt.index) == ["deepcluster", "deepcluster (paper)"]
    assert pt.at["deepcluster (paper)", "conv5"] == res[pid]["value"] and pt.at["deepcluster", "conv1"] == 10.0


def test_a_preset_without_instdisc_empties_the_table1_sweep(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    presets.apply("simclr_cifar10_r18", params)
    assert load_config(params).instdisc_table1.rows == {}
    presets.apply("instdisc_cifar10", params)  # InstDisc's preset sets the six rows again
    assert list(load_config(params).instdisc_table1.rows) == ["parametric", "nonparametric", "nce1", "nce10",
                                                              "nce512", "nce4096"]


def test_apply_regenerates_the_pretrain_stage(tmp_path):
    """Beside a dvc.yaml, apply rewrites the pretrain stage for the preset's methods (their params
    blocks and models) and deletes the earlier layout's pipelines/<m>/ files, and the tokenizer stage
    exists only while a method (BEiT) reads its file."""
    import shutil

    from selfsup.dag import stages_of

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    old = tmp_path / "pipelines" / "moco"
    old.mkdir(parents=True)
    (old / "dvc.yaml").write_text("stages: {}\n")
    (old / "dvc.lock").write_text("schema: '2.0'\n")
    assert "tokenizer" in stages_of(tmp_path)  # the default runs BEiT
    presets.apply("byol_cifar10", tmp_path / "params.yaml")
    stages = stages_of(tmp_path)
    assert [n for n in stages if n.startswith("pretrain")] == ["pretrain-byol"]
    pre = stages["pretrain-byol"]
    assert [o for o in pre["outs"] if isinstance(o, str)] == ["data/models/byol.pt"]
    assert "byol" in pre["params"] and "moco" not in pre["params"]
    assert "selfsup/methods/byol.py" in pre["deps"] and "selfsup/methods/moco.py" not in pre["deps"]
    assert "tokenizer" not in stages and not (tmp_path / "pipelines").exists()
    # BYOL's paper reports no VOC detection: voc.enabled keeps its typed default (off), no per-method outputs
    assert stages["voc"].get("metrics", []) == [] and stages["voc"]["outs"] == [{"data/voc_runs": {"persist": True}}]
    presets.apply("beit_cifar10", tmp_path / "params.yaml")
    stages = stages_of(tmp_path)
    assert "tokenizer" in stages and "data/tokenizer/tokenizer.pt" in stages["pretrain-beit"]["deps"]

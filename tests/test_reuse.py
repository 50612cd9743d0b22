"""The evaluate stage runs every method in one process and reuses a method's metrics while its model file
and the evaluation keys are unchanged (selfsup.eval.evaluate_all.evaluate_all); the voc stage's counterpart is
tested in tests/test_voc.py."""
import dataclasses
import os

import torch

from selfsup.eval import evaluate_all as frozen
from selfsup.core.config import load_config
from selfsup.core.stage import Paths


def test_evaluate_all_reuses_a_method_until_its_model_or_the_evaluation_keys_change(tmp_path, monkeypatch):
    calls = []

    def fake_extract(cfg, name, P, device):
        calls.append(name)
        for s in ("train", "test"):
            P.features(name, s).parent.mkdir(parents=True, exist_ok=True)
            P.features(name, s).write_bytes(b"f")
        return {"n": len(calls)}

    monkeypatch.setattr(frozen, "extract_all", fake_extract)
    import selfsup.models.backbones as backbones

    monkeypatch.setattr(backbones, "skipped_reason", lambda path: "")  # the stand-in model files are not torch files
    monkeypatch.setattr(frozen, "evaluate_features", lambda cfg, name, P, device, ext: {
        "extract": ext, "knn": {"top1": float(ext["n"]), "k": cfg.knn.k}})
    cfg = load_config({"methods": ["random", "supervised"], "device": "cpu"})
    P = Paths(tmp_path)
    P.dataset.mkdir(parents=True)
    (P.dataset / "meta.json").write_text("{}")
    for m in cfg.methods:
        P.model(m).parent.mkdir(parents=True, exist_ok=True)
        P.model(m).write_bytes(m.encode())

    def run(c):
        return {m: (out["knn"]["top1"], reused) for m, out, reused in frozen.evaluate_all(c, list(c.methods), P,
                                                                                         torch.device("cpu"))}

    assert run(cfg) == {"random": (1.0, False), "supervised": (2.0, False)}
    assert run(cfg) == {"random": (1.0, True), "supervised": (2.0, True)} and calls == ["random", "supervised"]
    P.model("supervised").write_bytes(b"retrained")  # one new model: only it is evaluated again
    assert run(cfg) == {"random": (1.0, True), "supervised": (3.0, False)}
    P.features("random", "test").unlink()  # its features gone (not a persist output any more): again
    assert run(cfg) == {"random": (4.0, False), "supervised": (3.0, True)}
    knn = cfg.replace(knn=dataclasses.replace(cfg.knn, temperature=0.1))  # an evaluation key: all
    assert run(knn) == {"random": (5.0, False), "supervised": (6.0, False)}
    assert calls == ["random", "supervised", "supervised", "random", "random", "supervised"]


def test_the_pretrain_stage_trains_only_what_changed(digits, tmp_path):
    """selfsup.engine.pretrain_all.train_all, the pretrain stage's loop: a second run resumes every finished
    run (zero batches) and rewrites each model file byte for byte (so evaluate and voc reuse their
    results); a changed block retrains that method only; MLCD trains after DeepCluster, whose encoder
    it reads, and retrains when that encoder changes."""
    from selfsup.engine.pretrain_all import train_all

    P = Paths(tmp_path)
    base = {"methods": {"mlcd": "data/models/deepcluster.pt", "random": "data/dataset", "deepcluster": "data/dataset"},
            "device": "cpu", "mlflow": {"enabled": False},
            "deepcluster": {"epochs": 1, "k": 10, "pca_dim": 16}, "mlcd": {"epochs": 1, "centres": 20}}

    def run(**over):
        cfg = load_config({**base, **over})
        cwd = os.getcwd()
        os.chdir(tmp_path)  # the MLCD upstream is a path relative to the repository root
        try:
            steps = {m: s for m, _, s in train_all(cfg, list(cfg.methods), digits, P, tmp_path)}
        finally:
            os.chdir(cwd)
        return steps, {m: P.model(m).read_bytes() for m in cfg.methods}

    first, models = run()
    assert list(first) == ["deepcluster", "mlcd", "random"] and first["deepcluster"] > 0 and first["mlcd"] > 0
    again, models2 = run()
    assert again == {"deepcluster": 0, "mlcd": 0, "random": 0} and models2 == models
    for m in ("deepcluster", "mlcd", "random"):
        assert P.metrics("pretrain", m).is_file() and P.history(m).is_file()
    k12, models3 = run(deepcluster={**base["deepcluster"], "k": 12})
    assert k12["deepcluster"] > 0 and k12["mlcd"] > 0 and k12["random"] == 0  # MLCD: a new upstream encoder
    assert models3["random"] == models["random"] and models3["deepcluster"] != models["deepcluster"]


def test_the_table1_stage_reuses_a_row_until_its_key_changes(digits, tmp_path, monkeypatch):
    """selfsup.eval.instdisc_table1.run_rows, the table1 stage's loop: a row is trained and evaluated once; a new row
    runs alone; a changed evaluation key (the linear probe) or InstDisc block runs every row again."""
    from selfsup.eval import instdisc_table1 as table1

    calls = []

    def fake_row(cfg, name, data, ckpt):
        calls.append(name)
        return {"n": len(calls)}

    monkeypatch.setattr(table1, "run_row", fake_row)
    rows = {"parametric": {"softmax": "parametric", "nce_m": 0}}
    base = {"methods": ["instdisc"], "device": "cpu", "instdisc_table1": {"rows": rows}}

    def run(**over):
        return {r: (out["n"], reused) for r, out, reused in table1.run_rows(load_config({**base, **over}), digits, tmp_path)}

    assert run() == {"parametric": (1, False)}
    assert run() == {"parametric": (1, True)}
    more = {"instdisc_table1": {"rows": {**rows, "nce10": {"softmax": "nonparametric", "nce_m": 10}}}}
    assert run(**more) == {"parametric": (1, True), "nce10": (2, False)}
    assert run(**more, linear={"epochs": 3}) == {"parametric": (3, False), "nce10": (4, False)}
    assert run(**more, instdisc={"temperature": 0.1}) == {"parametric": (5, False), "nce10": (6, False)}

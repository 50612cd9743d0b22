"""The evaluate stage runs every method in one process and reuses a method's metrics while its model file
and the evaluation keys are unchanged (selfsup.frozen.evaluate_all); the voc stage's counterpart is
tested in tests/test_voc.py."""
import dataclasses

import torch

from selfsup import frozen
from selfsup.config import load_config
from selfsup.stage import Paths


def test_evaluate_all_reuses_a_method_until_its_model_or_the_evaluation_keys_change(tmp_path, monkeypatch):
    calls = []

    def fake_extract(cfg, name, P, device):
        calls.append(name)
        for s in ("train", "test"):
            P.features(name, s).parent.mkdir(parents=True, exist_ok=True)
            P.features(name, s).write_bytes(b"f")
        return {"n": len(calls)}

    monkeypatch.setattr(frozen, "extract_all", fake_extract)
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
    knn = dataclasses.replace(cfg, knn=dataclasses.replace(cfg.knn, temperature=0.1))  # an evaluation key: all
    assert run(knn) == {"random": (5.0, False), "supervised": (6.0, False)}
    assert calls == ["random", "supervised", "supervised", "random", "random", "supervised"]

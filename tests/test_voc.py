"""VOC detection transfer: the devkit evaluator, the XML parser, the embedded set, the detector."""
import math
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from selfsup.core.config import ConfigError, build, load_config
from selfsup.detection.config import VocCfg
from selfsup.detection.detector import apply_bn, build_detector, lr_at, run_voc
from selfsup.core.io import InputError
from selfsup.models.backbones import build_backbone
from selfsup.detection.voc_data import compose_embedded, load_split, parse_voc_xml, prepare_voc, read_manifest
from selfsup.detection.voc_ap import CLASS_COLUMNS, evaluate_detections, voc_ap, voc_eval_class

B = [10.0, 10.0, 29.0, 29.0]  # a 20x20 box, 1-based inclusive


# --------------------------------------------------------------------------- evaluator
def gt(boxes, difficult=None, labels=None):
    n = len(boxes)
    return {"boxes": np.array(boxes, float).reshape(-1, 4), "labels": np.array(labels or [1] * n),
            "difficult": np.array(difficult or [False] * n, bool)}


def det(boxes, scores, labels=None):
    return {"boxes": np.array(boxes, float).reshape(-1, 4), "scores": np.array(scores, float),
            "labels": np.array(labels or [1] * len(scores))}


def test_voc_ap_hand_computed_curve():
    rec = np.array([0.25, 0.5, 0.5, 0.75])
    prec = np.array([1.0, 1.0, 2 / 3, 0.75])
    # 11-point: t in {0, .1, .2, .3, .4, .5} -> 1.0; t in {.6, .7} -> 0.75; t in {.8, .9, 1} -> 0
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx((6 * 1.0 + 2 * 0.75) / 11)
    # area under the envelope: .25 * 1 + .25 * 1 + .25 * .75 (+ .25 * 0)
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(0.6875)


def test_matching_builds_that_curve():
    # four objects in two images; by score: TP, TP, FP (no overlap), TP; one object missed
    gts = {0: (np.array([B, [40, 40, 59, 59]], float), np.zeros(2, bool)),
           1: (np.array([B, [40, 10, 59, 29]], float), np.zeros(2, bool))}
    dets = [(0, 0.9, B), (1, 0.8, B), (1, 0.7, [70, 70, 79, 79]), (0, 0.6, [40, 40, 59, 59])]
    rec, prec, npos = voc_eval_class(dets, gts, 0.5)
    assert npos == 4
    np.testing.assert_allclose(rec, [0.25, 0.5, 0.5, 0.75])
    np.testing.assert_allclose(prec, [1.0, 1.0, 2 / 3, 0.75])


def test_perfect_detections_give_ap_one_and_none_give_zero():
    g = [gt([B, [40, 40, 59, 59]], labels=[1, 2]), gt([[5, 5, 20, 30]], labels=[2])]
    perfect = [det(x["boxes"], [0.9] * len(x["labels"]), list(x["labels"])) for x in g]
    s, rows = evaluate_detections(perfect, g, ["a", "b"])
    for k in ("map50", "map50_area", "ap", "ap75"):
        assert s[k] == pytest.approx(100.0)
    assert [r["n_gt"] for r in rows] == [1, 2]
    assert all(tuple(r) == CLASS_COLUMNS for r in rows)  # the per-class CSV's columns, in order
    s0, _ = evaluate_detections([det([], []), det([], [])], g, ["a", "b"])
    assert s0["map50"] == 0.0 and s0["map50_area"] == 0.0 and s0["ap"] == 0.0


def test_duplicate_detection_is_a_false_positive():
    gts = {0: (np.array([B, [40, 40, 59, 59]], float), np.zeros(2, bool))}
    dets = [(0, 0.9, B), (0, 0.8, [10, 10, 29, 30]), (0, 0.7, [40, 40, 59, 59])]
    rec, prec, _ = voc_eval_class(dets, gts, 0.5)
    np.testing.assert_allclose(rec, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(prec, [1.0, 0.5, 2 / 3])
    # 11-point: recall <= .5 -> 1, above -> 2/3
    assert voc_ap(rec, prec, True) == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_difficult_objects_are_neither_true_nor_false_positives():
    gts = {0: (np.array([B, [40, 40, 59, 59]], float), np.array([True, False]))}
    dets = [(0, 0.9, B), (0, 0.8, [40, 40, 59, 59])]
    rec, prec, npos = voc_eval_class(dets, gts, 0.5)
    assert npos == 1  # recall counts the non-difficult object only
    np.testing.assert_allclose(rec, [0.0, 1.0])
    np.testing.assert_allclose(prec, [0.0, 1.0])  # the difficult hit adds to neither count
    assert voc_ap(rec, prec, True) == pytest.approx(1.0)
    # a class whose only object is difficult: no AP (NaN), left out of the mean
    g = [gt([B, [40, 40, 59, 59]], difficult=[True, False], labels=[1, 2])]
    s, rows = evaluate_detections([det([[40, 40, 59, 59]], [0.5], [2])], g, ["a", "b"])
    assert math.isnan(rows[0]["ap50"]) and rows[0]["n_difficult"] == 1
    assert s["map50"] == pytest.approx(100.0)


def test_iou_threshold_is_strict_and_uses_devkit_pixels():
    gts = {0: (np.array([[1, 1, 10, 10]], float), np.zeros(1, bool))}  # 10x10 pixels
    # [1, 1, 10, 5]: 50 of 100 pixels -> IoU exactly 0.5 -> not a match (devkit: ov > thresh)
    rec, prec, _ = voc_eval_class([(0, 0.9, [1, 1, 10, 5])], gts, 0.5)
    assert rec[-1] == 0.0
    rec, _, _ = voc_eval_class([(0, 0.9, [1, 1, 10, 6])], gts, 0.5)  # 60 / 100
    assert rec[-1] == 1.0


def test_coco_style_ap_averages_thresholds():
    g = [gt([[1, 1, 20, 20]])]
    # IoU of [1, 1, 20, 17] with the 20x20 box: 340 / 400 = 0.85 -> a match at 0.50 ... 0.80 (7 of 10)
    s, rows = evaluate_detections([det([[1, 1, 20, 17]], [0.9])], g, ["a"], ap_metric="area")
    assert rows[0]["ap"] == pytest.approx(70.0) and rows[0]["ap75"] == pytest.approx(100.0)
    assert s["map50"] == pytest.approx(100.0)


# --------------------------------------------------------------------------- parser
XML = """\
<annotation>
  <folder>VOC2007</folder><filename>000005.jpg</filename>
  <size><width>500</width><height>375</height><depth>3</depth></size>
  <segmented>0</segmented>
  <object><name>chair</name><pose>Rear</pose><truncated>0</truncated><difficult>0</difficult>
    <bndbox><xmin>263</xmin><ymin>211</ymin><xmax>324</xmax><ymax>339</ymax></bndbox></object>
  <object><name>chair</name><pose>Unspecified</pose><truncated>1</truncated><difficult>1</difficult>
    <bndbox><xmin>5</xmin><ymin>244</ymin><xmax>67</xmax><ymax>374</ymax></bndbox></object>
</annotation>
"""


def test_parser_reads_devkit_fields(tmp_path):
    f = tmp_path / "000005.xml"
    f.write_text(XML)
    a = parse_voc_xml(f)
    assert (a.filename, a.width, a.height, a.depth, a.folder, a.segmented) == ("000005.jpg", 500, 375, 3, "VOC2007", 0)
    assert [(o.name, o.pose, o.truncated, o.difficult) for o in a.objects] == [
        ("chair", "Rear", 0, 0), ("chair", "Unspecified", 1, 1)]
    assert a.objects[1].bbox == (5, 244, 67, 374)


@pytest.mark.parametrize("text", [
    XML[:200],  # cut short: not XML
    XML.replace("<bndbox><xmin>5</xmin><ymin>244</ymin><xmax>67</xmax><ymax>374</ymax></bndbox>", ""),
    XML.replace("<xmin>263</xmin>", "<xmin>abc</xmin>"),
    XML.replace("<xmax>324</xmax>", "<xmax>100</xmax>"),  # xmax < xmin
    XML.replace("<size><width>500</width><height>375</height><depth>3</depth></size>", ""),
])
def test_parser_rejects_malformed_file_naming_it(tmp_path, text):
    f = tmp_path / "broken_0042.xml"
    f.write_text(text)
    with pytest.raises(InputError, match="broken_0042.xml"):
        parse_voc_xml(f)


# --------------------------------------------------------------------------- embedded set
def small_cfg(**over):
    emb = {"trainval_images": 12, "test_images": 8, "truncated_p": 0.4, "difficult_p": 0.4}
    return build(VocCfg, {"enabled": True, "embedded": emb, "steps": 6, "warmup_steps": 2, "lr_steps": [4], **over}, "voc")


def test_embedded_set_is_deterministic_and_valid_voc(tmp_path):
    cfg = small_cfg()
    compose_embedded(cfg, 0, 0.2, tmp_path / "a")
    compose_embedded(cfg, 0, 0.2, tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 * 20 + 2
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    man = prepare_voc(cfg, 0, 0.2, tmp_path / "voc")
    recs = load_split(man, "trainval", tmp_path / "voc") + load_split(man, "test", tmp_path / "voc")
    objs = [o for _, a in recs for o in a.objects]
    assert sum(o.difficult for o in objs) > 0 and sum(o.truncated for o in objs) > 0
    for path, a in recs:
        assert path.is_file() and a.depth == 1
        for o in a.objects:
            x1, y1, x2, y2 = o.bbox
            assert 1 <= x1 <= x2 <= a.width and 1 <= y1 <= y2 <= a.height
            assert o.name in man["classes"]
    compose_embedded(cfg, 1, 0.2, tmp_path / "c")
    assert (tmp_path / "c/VOCdevkit/VOC2007/Annotations/tr00000.xml").read_bytes() != \
        (tmp_path / "a/VOCdevkit/VOC2007/Annotations/tr00000.xml").read_bytes()


def test_real_voc_offline_fails_clearly(tmp_path):
    cfg = build(VocCfg, {"enabled": True, "dataset": "voc2007", "path": str(tmp_path / "nowhere")}, "voc")
    from selfsup.data.sources import DatasetUnavailable

    with pytest.raises(DatasetUnavailable, match="VOC2007"):
        prepare_voc(cfg, 0, 0.2, tmp_path / "voc")


def test_voc_off_fetches_and_draws_nothing(tmp_path):
    """voc.enabled false (the typed default; presets whose paper has no detection table): an empty manifest,
    even for a VOC dataset that is not on this machine."""
    cfg = build(VocCfg, {"dataset": "voc2007", "path": str(tmp_path / "nowhere")}, "voc")
    man = prepare_voc(cfg, 0, 0.2, tmp_path / "voc")
    assert man["n_trainval"] == man["n_test"] == 0 and read_manifest(tmp_path / "voc") == man
    assert sorted(p.name for p in (tmp_path / "voc").iterdir()) == ["manifest.json"]


# --------------------------------------------------------------------------- detector
def test_run_voc_end_to_end_on_a_tiny_embedded_set(tmp_path):
    cfg = small_cfg()
    prepare_voc(cfg, 0, 0.2, tmp_path / "voc")
    torch.manual_seed(0)
    out = run_voc(build_backbone("smallcnn", 1), tmp_path / "voc", [0.3], [0.35], cfg, 0, torch.device("cpu"))
    s = out["summary"]
    assert len(out["history"]) == 6 and s["steps"] == 6
    for k in ("map50", "map50_area", "ap", "ap75"):
        assert 0.0 <= s[k] <= 100.0
    assert [r["class"] for r in out["per_class"]] == read_manifest(tmp_path / "voc")["classes"]
    assert all(math.isfinite(h["loss"]) for h in out["history"])


@pytest.mark.parametrize("name, arch", [("resnet18", "c4"), ("resnet18", "fpn"), ("nin", "c4"), ("smallcnn", "c4"),
                                        ("vit_digits", "c4")])
def test_detectors_build_and_train_a_step(name, arch):
    cfg = build(VocCfg, {"arch": arch, "min_size": 64, "max_size": 64, "rpn_proposals": [50, 20]}, "voc")
    model = build_detector(build_backbone(name, 3), 3, cfg, [0.5] * 3, [0.25] * 3)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # frozen BN everywhere
    model.train()
    losses = model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]),
                                              "labels": torch.tensor([2])}])
    loss = sum(losses.values())
    loss.backward()
    assert math.isfinite(float(loss.detach()))


def test_bn_modes():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    net[1].running_mean.fill_(0.5)
    frozen = apply_bn(net, "frozen")
    assert type(frozen[1]).__name__ == "FrozenBatchNorm2d" and float(frozen[1].running_mean[0]) == 0.5
    assert isinstance(apply_bn(nn.Sequential(nn.BatchNorm2d(4)), "train")[0], nn.BatchNorm2d)
    with pytest.raises(RuntimeError, match="voc.bn=sync"):
        apply_bn(nn.Sequential(nn.BatchNorm2d(4)), "sync")


def test_lr_schedule_warmup_and_steps():
    cfg = build(VocCfg, {"lr": 0.02, "steps": 100, "warmup_steps": 10, "lr_steps": [50, 80]}, "voc")
    assert lr_at(cfg, 0) == pytest.approx(0.02 * 0.001)
    assert lr_at(cfg, 10) == pytest.approx(0.02)
    assert lr_at(cfg, 50) == pytest.approx(0.002) and lr_at(cfg, 80) == pytest.approx(0.0002)


@pytest.mark.parametrize("over, key", [
    ({"arch": "c5"}, "voc.arch"), ({"bn": "group"}, "voc.bn"), ({"dataset": "voc2010"}, "voc.dataset"),
    ({"lr_steps": [500]}, "voc.lr_steps"), ({"embedded": {"classes": [3, 3]}}, "voc.embedded.classes"),
    ({"embedded": {"scales": [9]}}, "voc.embedded.scales"), ({"colour": 1}, "voc.colour"),
    ({"path": "VOCdevkit"}, "voc.path"),
])
def test_bad_voc_params_fail_naming_the_key(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config({"methods": ["random"], "voc": over})


def test_xml_writer_roundtrip(tmp_path):
    from selfsup.detection.voc_data import VocAnnotation, VocObject, write_voc_xml

    a = VocAnnotation("x.jpg", 40, 30, 1, [VocObject("digit1", (2, 3, 20, 25), truncated=1, difficult=1)], "VOC2007")
    write_voc_xml(tmp_path / "x.xml", a)
    assert parse_voc_xml(tmp_path / "x.xml") == a
    assert "<difficult>1</difficult>" in textwrap.dedent((tmp_path / "x.xml").read_text())


@pytest.mark.parametrize("n,b", [(10, 4), (9, 3), (3, 4), (4, 4)])
def test_one_process_batches_are_the_dataloader_shuffle(n, b):
    """The rank-aware loader draws exactly what DataLoader(shuffle=True, generator) drew before it
    (so one process fine-tunes as before), epoch after epoch, and leaves the global RNG (which the
    detector samples its RoIs with) as that did."""
    from selfsup.detection.detector import _collate, voc_loader

    def run(make):
        torch.manual_seed(0)
        dl = make()
        return [x for _ in range(3) for x in dl], torch.rand(3).tolist()

    ds = [(i,) for i in range(n)]
    old = run(lambda: torch.utils.data.DataLoader(ds, batch_size=b, shuffle=True, drop_last=n > b, collate_fn=_collate,
                                                  generator=torch.Generator().manual_seed(5)))
    assert run(lambda: voc_loader(ds, b, 5)) == old


def test_iou_exactly_at_the_threshold_follows_iou_compare():
    """Issue 12.10: the Python devkit port (detectron2) counts IoU > 0.5, the MATLAB devkit >= 0.5."""
    from selfsup.detection.voc_ap import voc_eval_class

    # ground truth 1..10 x 1..10 (100 px, inclusive); a detection 1..10 x 1..5 covers exactly half: IoU 0.5
    g = {0: (np.array([[1.0, 1.0, 10.0, 10.0]]), np.array([False]))}
    d = [(0, 0.9, [1.0, 1.0, 10.0, 5.0])]
    rec_gt, _, _ = voc_eval_class(d, g, 0.5, "gt")
    rec_ge, _, _ = voc_eval_class(d, g, 0.5, "ge")
    assert rec_gt[-1] == 0.0 and rec_ge[-1] == 1.0


def test_the_default_score_threshold_is_detectron2s():
    assert small_cfg().score_thresh == 0.05 and small_cfg().iou_compare == "gt"


def test_the_voc_stage_reuses_a_method_result_until_its_model_or_params_change(tmp_path, monkeypatch):
    """transfer_all: one detector per method, and a method whose model file, voc params, code and data
    are unchanged is not fine-tuned again (its stored result comes back, marked reused)."""
    import dataclasses

    from selfsup.detection import detector as detection

    calls = []

    def fake_run(backbone, voc_dir, mean, std, cfg, seed, device):
        calls.append(backbone)
        return {"summary": {"map50": float(len(calls)), "steps": cfg.steps}, "per_class": [], "history": []}

    monkeypatch.setattr(detection, "load_backbone", lambda path, device: path.name)
    monkeypatch.setattr(detection, "skipped_reason", lambda path: "")  # the stand-in model files are not torch files
    monkeypatch.setattr(detection, "run_voc", fake_run)
    cfg = load_config({"methods": ["random", "supervised"], "device": "cpu"})
    voc = tmp_path / "voc"
    voc.mkdir()
    (voc / "manifest.json").write_text("{}")
    models = {m: tmp_path / f"{m}.pt" for m in cfg.methods}
    for m, f in models.items():
        f.write_bytes(m.encode())

    def run(c):
        out = list(detection.transfer_all(c, models, voc, [0.3], [0.35], torch.device("cpu"), tmp_path / "runs"))
        return {name: (res["summary"]["map50"], reused) for name, res, reused in out}

    assert run(cfg) == {"random": (1.0, False), "supervised": (2.0, False)}
    assert run(cfg) == {"random": (1.0, True), "supervised": (2.0, True)} and len(calls) == 2
    models["random"].write_bytes(b"retrained")  # a new model of one method: only its detector runs
    assert run(cfg) == {"random": (3.0, False), "supervised": (2.0, True)}
    longer = cfg.replace(voc=dataclasses.replace(cfg.voc, steps=cfg.voc.steps + 1))
    assert run(longer) == {"random": (4.0, False), "supervised": (5.0, False)}  # a voc key: all of them
    assert calls == ["supervised.pt", "random.pt"][::-1] + ["random.pt", "random.pt", "supervised.pt"]

"""The pretext-task family (issue 13): RotNet's exact rotations and labels, its loss against a slow
per-image reference, and a few epochs on digits beating the random-init encoder."""
import torch

from conftest import make_cfg
from selfsup.features import extract_features
from selfsup.knn import knn_eval
from selfsup.methods.base import Batch
from selfsup.methods.rotnet import rotate_batch
from selfsup.train import build_method, pretrain

CPU = torch.device("cpu")


def test_rotations_are_exact_and_labelled():
    x = torch.randn(3, 2, 5, 5)
    xs, y = rotate_batch(x)
    assert xs.shape == (12, 2, 5, 5) and y.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    ccw90 = x.transpose(-1, -2).flip(-2)  # a quarter turn counter-clockwise, by hand
    assert torch.equal(xs[:3], x) and torch.equal(xs[3:6], ccw90)
    assert torch.equal(xs[6:9], x.flip(-1).flip(-2))  # half turn
    for k in range(4):  # turning back by k quarters recovers the image
        assert torch.equal(torch.rot90(xs[3 * k:3 * k + 3], -k, dims=(2, 3)), x)


def test_rotnet_loss_matches_a_per_image_reference(digits):
    cfg = make_cfg(methods=["rotnet"])
    m = build_method(cfg, "rotnet", digits).eval()  # eval: BN statistics do not depend on the batch
    x = torch.randn(6, 1, 8, 8)
    out = m(Batch([x], torch.zeros(6, dtype=torch.long), torch.arange(6)))
    ref = []
    with torch.no_grad():
        for i in range(6):
            for k in range(4):
                logits = m.head(m.backbone(torch.rot90(x[i:i + 1], k, dims=(2, 3))))
                ref.append(torch.nn.functional.cross_entropy(logits, torch.tensor([k])))
    assert torch.allclose(out.loss, torch.stack(ref).mean(), atol=1e-5)
    assert 0.0 <= float(out.logs["pretext_acc"]) <= 1.0


def test_rotnet_beats_random_init_on_digits(digits, tmp_path):
    def knn(name, **over):
        m, hist = pretrain(make_cfg(methods=[name], **over), name, digits, tmp_path / name / "ck.pt")
        tr = extract_features(m.backbone, digits.train, digits.meta, CPU)
        te = extract_features(m.backbone, digits.test, digits.meta, CPU)
        return knn_eval(tr, digits.train.y, te, digits.test.y, 200, 0.07, 10)["top1"], hist

    rand, _ = knn("random")
    rot, hist = knn("rotnet", rotnet={"epochs": 6, "batch_size": 32, "lr": 0.1, "nesterov": True,
                                      "crop_scale": [0.5, 1.0], "head": "mlp"})
    assert hist[-1]["pretext_acc"] > hist[0]["pretext_acc"] and hist[-1]["loss"] < hist[0]["loss"]
    assert rot > rand + 2.0, (rot, rand)

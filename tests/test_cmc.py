"""CMC (Tian et al. 2020): the skip on grayscale, the L / ab encoder behind its Lab adapter, both
losses against per-sample references written from the official code, the memory-bank updates and
an exact resume of a two-view run on colour images."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_resume_is_exact, make_cfg
from test_colorization import CPU, colour_data
from selfsup.augment.colour import rgb_to_lab
from selfsup.engine.contract import Batch
from selfsup.engine.loop import build_method, pretrain
from selfsup.models.backbones import LabViews, SplitTrunk, load_backbone, probe_points, save_backbone

SMALL = {"epochs": 2, "batch_size": 8, "lr": 0.03, "nce_k": 6, "temperature": 0.5, "lr_steps": [],
         "crop_scale": [0.5, 1.0]}


def cmc(data, **over):
    cfg = make_cfg(methods=["cmc"], cmc={**SMALL, **over})
    return cfg, build_method(cfg, "cmc", data)


def test_skipped_on_grayscale_with_its_reason(digits, tmp_path):
    m, hist = pretrain(make_cfg(methods=["cmc"], cmc=SMALL), "cmc", digits, tmp_path / "ck.pt")
    assert hist == [] and "grayscale" in m.skipped and m.backbone.adapter is None


def test_encoder_has_an_l_and_an_ab_network_and_loads_without_the_method(tmp_path):
    data = colour_data()
    cfg, m = cmc(data)
    m.eval()
    bb = m.backbone
    assert isinstance(bb.adapter, LabViews) and isinstance(bb.trunk, SplitTrunk) and bb.in_channels == 3
    assert bb.trunk.groups == [[0], [1, 2]] and bb.out_dim == sum(bb.trunk.dims)
    x = torch.randn(3, 3, 16, 16)
    rgb = (x * torch.tensor(data.meta["std"]).view(1, 3, 1, 1) + torch.tensor(data.meta["mean"]).view(1, 3, 1, 1))
    lab = rgb_to_lab(rgb.clamp(0, 1))
    mean = torch.tensor([50.0, 6.025, -6.6895]).view(1, 3, 1, 1)
    std = torch.tensor([50.0, 92.208, 101.1675]).view(1, 3, 1, 1)
    assert torch.allclose(bb.adapter(x), (lab - mean) / std, atol=1e-4)
    with torch.no_grad():
        views = bb.adapter(x)
        l_only, ab_only = bb.trunk.views[0](views[:, :1]), bb.trunk.views[1](views[:, 1:])
        assert torch.allclose(bb(x), torch.cat([l_only, ab_only], 1), atol=1e-6)  # L first, then ab
    save_backbone(tmp_path / "m.pt", m, cfg, data.meta)
    net = load_backbone(tmp_path / "m.pt", CPU)  # what extract / probes / VOC load: RGB in, no method code
    assert isinstance(net.trunk, SplitTrunk)
    with torch.no_grad():
        assert torch.allclose(net(x), bb(x), atol=1e-5)
    # the per-layer probes read both encoders at each stage, side by side (L's channels, then ab's)
    points = probe_points(net)
    got, per_view = {}, [{}, {}]
    hooks = [p.register_forward_hook(lambda _m, _i, o, n=n: got.__setitem__(n, o.clone())) for n, p in points.items()]
    for v, pts in enumerate(net.trunk._points):
        hooks += [p.register_forward_hook(lambda _m, _i, o, n=n, v=v: per_view[v].__setitem__(n, o.clone()))
                  for n, p in pts.items()]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    assert list(got) == list(points) == list(per_view[0]) and len(points) >= 3
    for n, t in got.items():
        assert torch.equal(t, torch.cat([per_view[0][n], per_view[1][n]], 1))


def ref_nce(scores, z, n, k):
    """Official NCECriterion on exp(v^T f / T) / Z, one sample at a time (eps left out: the project's
    log-domain form has none)."""
    pn = 1.0 / n
    total = 0.0
    for row in scores:
        p = [math.exp(s) / z for s in row.tolist()]
        total -= math.log(p[0] / (p[0] + k * pn))
        total -= sum(math.log(k * pn / (q + k * pn)) for q in p[1:])
    return total / len(scores)


def ref_softmax(scores):
    total = 0.0
    for row in scores.tolist():
        total -= row[0] - math.log(sum(math.exp(s) for s in row))
    return total / len(scores)


@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_loss_matches_a_per_sample_reference(loss):
    data = colour_data(n=32)
    _, m = cmc(data, loss=loss, nce_k=5)
    m.train()
    x = torch.randn(4, 3, 16, 16)
    idx = torch.tensor([3, 7, 11, 30])
    with torch.no_grad():
        f_l, f_ab = m.embed(x)
    torch.manual_seed(5)
    out = m(Batch([x], torch.zeros(4, dtype=torch.long), idx))
    torch.manual_seed(5)
    noise = torch.randint(0, 32, (4, 5))
    bank_l, bank_ab = m.banks[0].memory.double(), m.banks[1].memory.double()
    # L against the ab bank, ab against the L bank, each at its own entry then the noise entries
    s_l = torch.tensor([[float(bank_ab[j] @ f_l[b].double()) / 0.5 for j in [int(idx[b]), *noise[b].tolist()]]
                        for b in range(4)], dtype=torch.float64)
    s_ab = torch.tensor([[float(bank_l[j] @ f_ab[b].double()) / 0.5 for j in [int(idx[b]), *noise[b].tolist()]]
                         for b in range(4)], dtype=torch.float64)
    if loss == "nce":  # Z of each view: N x the mean of exp(score) over the first batch, then fixed
        z_l, z_ab = (32 * s.exp().mean().item() for s in (s_l, s_ab))
        assert m.z.tolist() == pytest.approx([z_l, z_ab], rel=1e-5)
        expect = ref_nce(s_l, z_l, 32, 5) + ref_nce(s_ab, z_ab, 32, 5)
    else:
        expect = ref_softmax(s_l) + ref_softmax(s_ab)
    assert out.loss.item() == pytest.approx(expect, rel=1e-4)


def test_each_bank_takes_its_own_views_embeddings_after_the_step():
    data = colour_data(n=32)
    _, m = cmc(data)
    m.train()
    x = torch.randn(4, 3, 16, 16)
    idx = torch.tensor([0, 5, 9, 31])
    before = [b.memory.clone() for b in m.banks]
    m(Batch([x], torch.zeros(4, dtype=torch.long), idx))
    assert all(torch.equal(b.memory, o) for b, o in zip(m.banks, before))  # the update waits for the step
    with torch.no_grad():
        f_l, f_ab = m.embed(x)
    m.on_after_step(stepped=True)
    for bank, old, f in zip(m.banks, before, (f_l, f_ab)):
        assert torch.allclose(bank.memory[idx], F.normalize(0.5 * old[idx] + 0.5 * f, dim=1), atol=1e-6)
        rest = torch.ones(32, dtype=torch.bool)
        rest[idx] = False
        assert torch.equal(bank.memory[rest], old[rest])


def test_resume_is_exact(tmp_path):
    data = colour_data(n=40)
    cfg = make_cfg(methods=["cmc"], cmc={**SMALL, "epochs": 2})
    hist = assert_resume_is_exact(cfg, "cmc", data, tmp_path)  # both encoders, heads, both banks, the Zs
    assert np.isfinite([h["loss"] for h in hist]).all()


# the two-process run (both banks, both encoders and the Zs equal on the ranks): tests/test_distributed.py

"""InstDisc: NCE and the exact non-parametric softmax against slow references written from
the paper's formulas, the memory bank, Z fixed after the first batch, the config checks,
a few epochs on digits, and the Table 1 report."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_resume_is_exact, make_cfg
from selfsup.core.config import ConfigError
from selfsup.eval.config import Table1Row
from selfsup.models.features import extract_features
from selfsup.eval.knn import knn_eval
from selfsup.methods import Batch
from selfsup.losses.nce import estimate_z, full_softmax_loss, nce_loss
from selfsup.models.memory_bank import MemoryBank
from selfsup.report.results import load_paper_results, table1, table1_markdown
from selfsup.eval.instdisc_table1 import row_config
from selfsup.engine.loop import build_method, pretrain

CPU = torch.device("cpu")


def nce_reference(logits, z, n):
    """Eq. 3-6 of the paper, one sample and one noise draw at a time:
    P = exp(v^T f / tau) / Z, h = P / (P + m / n), J = -log h(pos) - sum_j log(1 - h(noise_j))."""
    m = logits.shape[1] - 1
    total = 0.0
    for row in logits.tolist():
        p = [math.exp(s) / z for s in row]
        h = [q / (q + m / n) for q in p]
        total += -math.log(h[0]) - sum(math.log(1.0 - hj) for hj in h[1:])
    return total / len(logits)


def softmax_reference(v, memory, idx, t):
    total = 0.0
    for f, i in zip(v.tolist(), idx.tolist()):
        s = [sum(a * b for a, b in zip(f, w)) / t for w in memory.tolist()]
        mx = max(s)
        total += -(s[i] - mx - math.log(sum(math.exp(x - mx) for x in s)))
    return total / len(idx)


def test_nce_loss_matches_the_paper_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1 + 7, generator=g, dtype=torch.float64) * 3  # (B, 1 + m)
    n = 50
    z = estimate_z(logits, n)
    assert z == pytest.approx(float(logits.exp().mean()) * n)
    got = nce_loss(logits, math.log(z), n).item()
    assert got == pytest.approx(nce_reference(logits, z, n), rel=1e-9)
    # a fixed Z other than the estimate
    assert nce_loss(logits, math.log(3.0), n).item() == pytest.approx(nce_reference(logits, 3.0, n), rel=1e-9)


def test_nce_loss_identical_embeddings_exact_value():
    # all entries equal: Z from this batch gives P = 1/n, h = 1/(1+m):
    # J = log(1+m) + m log((1+m)/m)
    for m in (1, 10, 512):
        logits = torch.full((4, 1 + m), 1.0 / 0.07, dtype=torch.float64)
        n = 1000
        z = estimate_z(logits, n)
        want = math.log(1 + m) + m * math.log((1 + m) / m)
        assert nce_loss(logits, math.log(z), n).item() == pytest.approx(want, rel=1e-9)


def test_full_softmax_matches_reference_and_log_n_for_identical_embeddings():
    g = torch.Generator().manual_seed(1)
    mem = F.normalize(torch.randn(9, 4, generator=g, dtype=torch.float64), dim=1)  # (N, D)
    v = F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1)  # (B, D)
    idx = torch.tensor([0, 4, 8])
    assert full_softmax_loss(v, mem, idx, 0.1).item() == pytest.approx(softmax_reference(v, mem, idx, 0.1), rel=1e-9)
    same = F.normalize(torch.ones(9, 4, dtype=torch.float64), dim=1)
    assert full_softmax_loss(same[:3], same, idx, 0.07).item() == pytest.approx(math.log(9), rel=1e-12)


def test_memory_bank_init_update_and_renormalisation():
    a, b = MemoryBank(20, 16, seed=3), MemoryBank(20, 16, seed=3)
    assert torch.equal(a.memory, b.memory)  # seeded
    stdv = 1 / math.sqrt(16 / 3)
    assert a.memory.abs().max() <= stdv and a.memory.shape == (20, 16)
    assert torch.allclose(MemoryBank(20, 16, 3, init="unit").memory.norm(dim=1), torch.ones(20))
    old = a.memory.clone()
    idx = torch.tensor([2, 7])
    v = F.normalize(torch.randn(2, 16), dim=1)
    a.update(idx, v, momentum=0.5)
    want = F.normalize(0.5 * old[idx] + 0.5 * v, dim=1)
    assert torch.allclose(a.memory[idx], want, atol=1e-6)
    assert torch.allclose(a.memory[idx].norm(dim=1), torch.ones(2))
    rest = torch.ones(20, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(a.memory[rest], old[rest])
    a.update(idx, 3 * v, momentum=0.0)  # the paper's plain copy (normalised)
    assert torch.allclose(a.memory[idx], v, atol=1e-6)
    assert "memory" in dict(a.named_buffers())  # in state_dict, hence the checkpoint
    neg = a.sample_negatives(4, 30, torch.Generator().manual_seed(0))
    assert neg.shape == (4, 30) and neg.min() >= 0 and neg.max() < 20


def instdisc_cfg(**over):
    base = {"epochs": 12, "batch_size": 32, "lr": 0.03, "crop_scale": [0.5, 1.0], "lr_steps": [], "nce_m": 256,
            "temperature": 0.5}
    base.update(over)
    return make_cfg(methods=["instdisc", "random"], instdisc=base)


def test_z_is_estimated_once_and_carried_by_the_checkpoint(digits):
    cfg = instdisc_cfg(nce_m=20)
    torch.manual_seed(0)
    m = build_method(cfg, "instdisc", digits)
    x = torch.randn(8, 1, 8, 8)
    idx = torch.arange(8)
    assert float(m.z) == 0.0
    mem0 = m.bank.memory.clone()
    with torch.no_grad():
        f = m.embed(x)
    torch.manual_seed(123)  # the noise draws come from the global RNG (the loop seeds it per step)
    out = m(Batch([x], idx, idx))
    z1 = float(m.z)
    assert z1 > 0 and float(out.logs["z"]) == pytest.approx(z1, rel=1e-6)
    assert mem0.shape[0] == digits.meta["n_train"]
    assert torch.equal(m.bank.memory, mem0)  # the bank waits for the step
    m.on_after_step(stepped=True)
    assert not torch.equal(m.bank.memory[idx], mem0[idx])  # the batch's entries were updated
    m(Batch([x + 1], idx + 8, idx + 8))
    assert float(m.z) == z1  # fixed after the first batch
    fresh = build_method(cfg, "instdisc", digits)
    fresh.load_checkpoint_state(m.checkpoint_state())
    assert float(fresh.z) == z1 and torch.equal(fresh.bank.memory, m.bank.memory)
    # Z = N * mean(exp(v^T f / T)) over the first batch's positive and noise entries (Eq. 7)
    n = mem0.shape[0]
    torch.manual_seed(123)
    noise = torch.randint(0, n, (8, 20))
    ids = torch.cat([idx[:, None], noise], 1)  # (B, 1 + m)
    logits = torch.einsum("bkd,bd->bk", mem0[ids], f) / 0.5
    assert z1 == pytest.approx(float(logits.double().exp().mean()) * n, rel=1e-5)
    assert f.shape == (8, 128) and torch.allclose(f.norm(dim=1), torch.ones(8), atol=1e-5)


def test_proximal_term_adds_lambda_times_the_distance_to_the_memory_entry(digits):
    """Sec. 3.4: J + lambda * ||f_i(t) - v_i(t-1)||^2, v_i the bank entry before this step's update."""
    x, idx = torch.randn(6, 1, 8, 8), torch.arange(6) * 7
    losses, mems, feats = {}, {}, {}
    for lam in (0.0, 0.3):
        torch.manual_seed(0)
        m = build_method(instdisc_cfg(nce_m=0, prox_lambda=lam), "instdisc", digits).eval()  # exact softmax
        mems[lam] = m.bank.memory.clone()
        with torch.no_grad():
            feats[lam] = m.embed(x)
        out = m(Batch([x], idx, idx))
        losses[lam], logs = out.loss, out.logs
    assert torch.equal(mems[0.0], mems[0.3]) and torch.allclose(feats[0.0], feats[0.3])
    f, v = feats[0.3].double(), mems[0.3][idx].double()
    ref = sum(float(((fi - vi) ** 2).sum()) for fi, vi in zip(f, v)) / len(idx)
    assert float(logs["prox"]) == pytest.approx(ref, rel=1e-5)
    assert float((losses[0.3] - losses[0.0]).detach()) == pytest.approx(0.3 * ref, rel=1e-4)


def test_config_checks(digits):
    with pytest.raises(ConfigError, match="instdisc.nce_m"):
        build_method(instdisc_cfg(nce_m=digits.meta["n_train"]), "instdisc", digits)
    with pytest.raises(ConfigError, match="instdisc.nce_m"):
        instdisc_cfg(softmax="parametric", nce_m=5)
    with pytest.raises(ConfigError, match="instdisc.memory_momentum"):
        instdisc_cfg(memory_momentum=1.0)
    with pytest.raises(ConfigError, match="instdisc_table1.rows.x.softmax"):
        make_cfg(instdisc_table1={"rows": {"x": {"softmax": "bad"}}})
    par = build_method(instdisc_cfg(softmax="parametric", nce_m=0), "instdisc", digits)
    assert par.bank is None and par.classifier.weight.shape == (digits.meta["n_train"], 128)


def knn_top1(backbone, data, t):
    tr = extract_features(backbone, data.train, data.meta, CPU)
    te = extract_features(backbone, data.test, data.meta, CPU)
    return knn_eval(tr, data.train.y, te, data.test.y, 200, t, 10)["top1"]


def test_instdisc_epochs_on_digits(digits, tmp_path):
    cfg = instdisc_cfg()
    method, hist = pretrain(cfg, "instdisc", digits, tmp_path / "i.pt")
    rand, _ = pretrain(cfg, "random", digits, tmp_path / "r.pt")
    assert len(hist) == 12 and hist[-1]["loss"] < hist[0]["loss"]
    assert all(h["z"] == hist[0]["z"] for h in hist)  # Z fixed from the first batch on
    s, r = knn_top1(method.backbone, digits, 0.5), knn_top1(rand.backbone, digits, 0.5)
    assert s > r, (s, r)


def test_table1_rows_and_report():
    cfg = make_cfg(methods=["random"], instdisc={"nce_m": 10, "epochs": 5, "lr_steps": []},
                   instdisc_table1={"epochs": 2, "rows": {"p": {"softmax": "parametric"}, "big": {"nce_m": 4096}}})
    rows = cfg.instdisc_table1.rows
    mcfg, m = row_config(cfg, rows["big"], 1437)
    assert m == 1436 and mcfg.nce_m == 1436 and mcfg.epochs == 2 and mcfg.softmax == "nonparametric"
    mcfg, m = row_config(cfg, rows["p"], 1437)
    assert m == 0 and mcfg.softmax == "parametric"
    res = {
        "p": {"softmax": "parametric", "nce_m": 0, "nce_m_used": 0, "epochs": 2, "final_loss": 7.0,
              "pretrain_seconds": 1.0, "knn_top1": 50.0, "linear_top1": 60.0, "svm_top1": 55.0},
        "big": {"softmax": "nonparametric", "nce_m": 4096, "nce_m_used": 1436, "epochs": 2, "final_loss": 9.0,
                "pretrain_seconds": 1.0, "knn_top1": 70.0, "linear_top1": 80.0},
    }
    t = table1(res)
    pub = load_paper_results()
    assert t.loc["big", "paper_knn_top1"] == pub["instdisc/cifar10/resnet18/nce4096/knn"]["value"] == 80.4
    assert t.loc["p", "paper_linear_svm_top1"] == 60.3
    md = table1_markdown(t, ["note"])
    assert "NCE m = 4096 (m used: 1436)" in md and "| p | parametric softmax | 55.0 | 60.3 | 50.0 | 63.0 | 60.0 |" in md
    assert Table1Row().softmax == "nonparametric"


def test_resume_after_a_kill_is_exact(digits, tmp_path):
    """Memory bank, Z and the per-epoch noise stream survive a kill: the resumed run equals
    an uninterrupted one (CPU, fixed seed)."""
    from selfsup.data.prepared import Data, Split

    small = Data(Split(digits.train.x[:160], digits.train.y[:160]), digits.test, {**digits.meta, "n_train": 160})
    cfg = instdisc_cfg(epochs=2, nce_m=16)
    assert_resume_is_exact(cfg, "instdisc", small, tmp_path)  # backbone, head, memory bank, Z


def test_resume_after_a_kill_at_a_random_step_is_exact(digits, tmp_path):
    """Killed at a random step in the middle of an epoch (a checkpoint at every step): the bank,
    Z, the noise draws and the optimiser continue exactly, and the model file is byte-identical."""
    import numpy as np

    from selfsup.data.prepared import Data, Split

    small = Data(Split(digits.train.x[:160], digits.train.y[:160]), digits.test, {**digits.meta, "n_train": 160})
    cfg = make_cfg(methods=["instdisc"], log_every=1, checkpoint_minutes=0.0,
                   instdisc={"epochs": 2, "batch_size": 32, "nce_m": 16, "temperature": 0.5, "crop_scale": [0.5, 1.0]})
    rng = np.random.default_rng()
    assert_resume_is_exact(cfg, "instdisc", small, tmp_path, kill_after=int(rng.integers(0, 2)),
                           kill_at_batch=int(rng.integers(1, 5)))  # any of the 5 batches but the last

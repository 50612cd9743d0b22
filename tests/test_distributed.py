"""Several processes (torch.distributed, gloo on the CPU): every method trains under DDP with the
ranks in step (CMC on a colour stand-in), the maths of 2 ranks x B/2 equals 1 rank x B where it is defined, the shared state
(MoCo's queue, InstDisc's bank) stays identical, extraction shards exactly, and a run that loses a
rank stops with an error naming it and resumes."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from conftest import ROOT, make_cfg
from distributed import run_ranks

METHODS = ["deepcluster", "sela", "mlcd", "instdisc", "invaspread", "cpc", "moco", "simclr", "byol", "simsiam", "swav",
           "deepclusterv2", "supervised",
           "random"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())  # the digits defaults of each method


def small_cfg(name, **over):
    block = {**(PARAMS.get(name) or {})}
    if name != "random":
        block.update(epochs=1, batch_size=16)
    for k, v in {"k": 10, "pca_dim": 8, "clusters": 10, "heads": 2, "centres": 20, "nce_m": 16, "queue_size": 64,
                 "relabel_times": 2, "warmup_epochs": 0}.items():
        if k in block:
            block[k] = v
    block.update(over)
    return make_cfg(methods=[name], **{name: block}, log_every=1)


def small_data(folder, n=160):
    from selfsup.data.prepared import Data, Split, load_prepared

    d = load_prepared(folder)
    return Data(Split(d.train.x[:n], d.train.y[:n]), d.test, {**d.meta, "n_train": n})


def state_digest(module):
    """float64 sums of every state_dict entry (ranks compare them exactly)."""
    return {k: float(v.double().sum()) for k, v in module.state_dict().items()}


# ----------------------------------------------------------------- every method trains in step
def _train_all(folder, tmp):
    from selfsup.core import dist
    from selfsup.engine.loop import pretrain

    data = small_data(folder)
    out = {}
    for name in METHODS:
        m, hist = pretrain(small_cfg(name), name, data, Path(tmp) / f"{name}-{dist.rank()}" / "ck.pt")
        out[name] = {"state": state_digest(m), "loss": [h["loss"] for h in hist]}
    # CMC needs colour (skipped on the digits): its two views on a colour stand-in, the same images on
    # both ranks; every rank's banks take all ranks' embeddings and the Zs are one estimate for all
    from test_cmc import SMALL as CMC_SMALL
    from test_colorization import colour_data

    m, hist = pretrain(make_cfg(methods=["cmc"], cmc={**CMC_SMALL, "epochs": 1}, log_every=1), "cmc",
                       colour_data(n=48), Path(tmp) / f"cmc-{dist.rank()}" / "ck.pt")
    out["cmc"] = {"state": state_digest(m), "loss": [h["loss"] for h in hist]}
    # MLCD with its centres sharded over the ranks: the rest of the state in step, the checkpoint
    # holds all the centres (written by rank 0, gathered from both)
    ck = Path(tmp) / "mlcd-sharded" / "ck.pt"
    m, hist = pretrain(small_cfg("mlcd", shard_centres=True), "mlcd", data, ck)
    dist.barrier()
    state = torch.load(ck, weights_only=False)["method"]["module"]
    out["mlcd_sharded"] = {"state": {k: v for k, v in state_digest(m).items() if k != "centres"},
                           "loss": [h["loss"] for h in hist], "shard": tuple(m.centres.shape),
                           "saved": tuple(state["centres"].shape)}
    return out


def test_every_method_keeps_the_ranks_in_step(digits_folder, tmp_path):
    r0, r1 = run_ranks(_train_all, 2, (str(digits_folder), str(tmp_path)))
    for name in [*METHODS, "cmc"]:
        assert r0[name]["state"] == r1[name]["state"], name  # parameters and buffers: queue, bank, labels
        assert r0[name]["loss"] == r1[name]["loss"], name  # the logged means are all-reduced
        if name != "random":
            assert len(r0[name]["loss"]) == 1 and np.isfinite(r0[name]["loss"]).all(), name
    sh0, sh1 = r0["mlcd_sharded"], r1["mlcd_sharded"]
    assert sh0["state"] == sh1["state"] and sh0["loss"] == sh1["loss"] and np.isfinite(sh0["loss"]).all()
    assert sh0["shard"] == sh1["shard"] == (10, 128) and sh0["saved"] == (20, 128)
    # the state that only the methods' own gathers keep equal (DDP does not broadcast buffers)
    assert any(k.startswith("queue.") for k in r0["moco"]["state"])
    assert "bank.memory" in r0["instdisc"]["state"] and "labels" in r0["sela"]["state"]
    assert {"banks.0.memory", "banks.1.memory", "z"} <= set(r0["cmc"]["state"])


# ----------------------------------------------------------------- 2 x B/2 == 1 x B
def _frozen(m):
    """Batch norm from its running statistics: each sample's output no longer depends on the batch."""
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.eval()
    return m


def _method_for_grads(name, folder, shard=False):
    from selfsup.methods import Batch  # noqa: F401
    from selfsup.engine.loop import build_method

    over = {"nce_m": 0} if name == "instdisc" else {"negative_ratio": 1.0} if name == "mlcd" else {}
    if shard:
        over["shard_centres"] = True
    if name == "moco":
        over["bn_splits"] = 1
    if name == "cpc":  # a 7 x 7 grid on the 8 px test views; no per-patch draws (the ranks draw their own)
        over.update(patch=2, stride=1, eval_stride=0, patch_flip=False, colour_drop=False, patch_crop=1.0)
    cfg = small_cfg(name, **over)
    data = small_data(folder)
    m = _frozen(build_method(cfg, name, data).train())
    g = torch.Generator().manual_seed(5)
    n = data.n_train
    if name == "deepcluster":
        m.pseudo.copy_(torch.randint(0, m.cfg.k, (n,), generator=g))
    if name == "sela":
        m.labels.copy_(torch.randint(0, m.cfg.clusters, m.labels.shape, generator=g))
    if name == "mlcd":
        ids = torch.stack([torch.randperm(m.cfg.centres, generator=g)[:m.cfg.positives] for _ in range(n)])
        m._set_assignment(ids.numpy(), torch.rand(ids.shape, generator=g).numpy(), torch.device("cpu"))
    return m


def _batch(name, m, lo, hi):
    from selfsup.methods import Batch

    g = torch.Generator().manual_seed(11)
    b = 16
    views = [torch.randn(b, 1, 8, 8, generator=g) for _ in range(sum(s.count for s in m.view_specs()))]
    idx = torch.arange(b) * 3
    y = torch.randint(0, 10, (b,), generator=g)
    return Batch([v[lo:hi] for v in views], y[lo:hi], idx[lo:hi])


def _grads_ddp(name, folder, shard=False):
    from selfsup.core import dist

    m = _method_for_grads(name, folder, shard)
    from selfsup.engine.loop import ddp_ignore

    m._ddp_params_and_buffers_to_ignore = ddp_ignore(m)  # as the engine: DDP leaves the shard alone
    ddp = nn.parallel.DistributedDataParallel(m, forward_sync_buffers=False)
    r = dist.rank()
    ddp(_batch(name, m, 8 * r, 8 * (r + 1))).loss.backward()
    out = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    if shard:
        out["centre_rows"] = (m.centre_lo, m.centre_lo + m.centres.shape[0])
    return out


GRAD_METHODS = ["deepcluster", "sela", "mlcd", "instdisc", "invaspread", "cpc", "moco", "simclr", "supervised"]


def _grads_all(folder):
    return {**{name: _grads_ddp(name, folder) for name in GRAD_METHODS},
            "mlcd_sharded": _grads_ddp("mlcd", folder, shard=True)}


def test_two_ranks_of_half_batches_give_the_one_process_gradients(digits_folder):
    """With batch norm frozen (running statistics), each loss is a mean over the global batch of
    per-sample terms whose negatives (SimCLR, InvaSpread: gathered; MoCo: the queue) are the same
    in both settings, so DDP's averaged gradient equals the one-process gradient."""
    r0, r1 = run_ranks(_grads_all, 2, (str(digits_folder),))
    for name in GRAD_METHODS:
        m = _method_for_grads(name, str(digits_folder))
        m(_batch(name, m, 0, 16)).loss.backward()
        ref = {k: p.grad for k, p in m.named_parameters() if p.grad is not None}
        assert set(ref) == set(r0[name]), name
        for k, g in ref.items():
            torch.testing.assert_close(r0[name][k], g, rtol=1e-4, atol=1e-6, msg=f"{name} {k}")
            assert torch.equal(r0[name][k], r1[name][k]), (name, k)  # all-reduced: the same on every rank
    # MLCD with its centres sharded over the ranks (PartialFC's model parallelism): the backbone
    # gradient and each rank's rows of the centres' gradient are the one-process ones
    m = _method_for_grads("mlcd", str(digits_folder))
    m(_batch("mlcd", m, 0, 16)).loss.backward()
    for r in (r0, r1):
        sh = r["mlcd_sharded"]
        lo, hi = sh["centre_rows"]
        assert hi - lo == 10  # 20 centres over 2 ranks
        torch.testing.assert_close(sh["centres"], m.centres.grad[lo:hi], rtol=1e-4, atol=1e-7)
        for k, p in m.named_parameters():
            if k != "centres" and p.grad is not None:
                torch.testing.assert_close(sh[k], p.grad, rtol=1e-4, atol=1e-6, msg=f"mlcd sharded {k}")


# ----------------------------------------------------------------- sharded extraction
def _extract(folder):
    from selfsup.models.features import extract_sharded
    from selfsup.models.backbones import build_backbone

    data = small_data(folder, n=301)
    torch.manual_seed(3)
    net = build_backbone("smallcnn", 1)
    return extract_sharded(net, data.train, data.meta, torch.device("cpu"), batch_size=32)


def test_sharded_extraction_equals_one_process(digits_folder):
    from selfsup.models.features import extract_features
    from selfsup.models.backbones import build_backbone

    r0, r1 = run_ranks(_extract, 2, (str(digits_folder),))
    data = small_data(str(digits_folder), n=301)
    torch.manual_seed(3)
    ref = extract_features(build_backbone("smallcnn", 1), data.train, data.meta, torch.device("cpu"), batch_size=32)
    assert r0.shape == (301, 128)
    np.testing.assert_allclose(r0, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(r0, r1)


# ----------------------------------------------------------------- the batches of W ranks
def test_ranks_share_the_global_batches():
    from selfsup.data.loader import EpochBatches

    order = np.random.default_rng(0).permutation(100)
    one = EpochBatches(32, False)
    one.set_epoch(order, 7)
    two = [EpochBatches(16, False, r, 2) for r in range(2)]
    for t in two:
        t.set_epoch(order, 7)
    assert two[0].num_batches() == 3  # 3 global batches of 32; the incomplete 4th is dropped
    for s, (a, b0, b1) in enumerate(zip(one, *two)):
        assert a == b0 + b1, s  # same indices and per-sample seeds, split by rank
    # resuming with another number of processes continues at the same sample
    three = EpochBatches(16, False, 0, 1)
    three.set_epoch(order, 7, start_batch=4)  # after 2 global batches of 2 x 16
    assert next(iter(three))[0] == list(two[0])[2][0]


# ----------------------------------------------------------------- a lost rank
def _stage(tmp, *args, env=None, timeout=600):
    cmd = [sys.executable, str(ROOT / "stages" / args[0]), *args[1:]]
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=tmp, env=e, capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


def test_a_lost_rank_stops_the_run_and_it_resumes(tmp_path):
    """Rank 1 is killed (SIGKILL) in the middle of epoch 2: the stage exits non-zero, torchrun names
    the lost rank, within the collective timeout; the same command (what `dvc repro` runs) then
    resumes from the last checkpoint and finishes, here with one process instead of two (a lost
    node): it continues at the same sample of the epoch."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["methods"] = {"moco": "data/dataset"}
    params["dataset"].update(max_train=256, max_test=64)
    params["moco"].update(epochs=3, batch_size=32, queue_size=128)
    params.update(device="cpu", log_every=1, checkpoint_minutes=0.0)
    params["mlflow"]["enabled"] = False
    params["dist"].update(nproc_per_node=2, timeout_s=60)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r, _ = _stage(tmp_path, "download.py")
    assert r.returncode == 0, r.stderr[-3000:]
    # tests/faults/sitecustomize.py kills rank 1 after batch 2 of epoch 2 (no fault hook in the loop)
    r, took = _stage(tmp_path, "pretrain.py", "moco",
                     env={"SELFSUP_KILL_AT": "1,1,2", "PYTHONPATH": f"{ROOT / 'tests' / 'faults'}:{ROOT}"})
    assert r.returncode != 0 and took < 60 + 60, (r.returncode, took)
    err = r.stderr
    assert "rank: 1" in err and ("Signal 9" in err or "SIGKILL" in err or "exitcode: -9" in err), err[-3000:]
    # the launcher's verdict names the lost rank (torchrun's "root cause" may name rank 0, stopped after it)
    verdict = [ln for ln in err.splitlines() if ln.startswith("launch: torchrun failed")]
    assert len(verdict) == 1 and "rank 1 (pid" in verdict[0] and "was lost" in verdict[0], err[-3000:]
    assert "rank 0 (pid" not in verdict[0], verdict[0]
    ck = torch.load(tmp_path / "data" / "pretrain" / "moco" / "ckpt.pt", weights_only=False)
    assert (ck["epoch"], ck["world"]) == (1, 2) and ck["batch"] >= 1  # mid-epoch 2, written by rank 0
    params["dist"]["nproc_per_node"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r, _ = _stage(tmp_path, "pretrain.py", "moco")
    assert r.returncode == 0, r.stderr[-3000:]
    pos = ck["batch"] * 2 * 32
    assert f"written by 2 processes, resuming with 1 at sample {pos} of epoch 2" in r.stderr, r.stderr[-3000:]
    assert "resuming" in r.stderr, r.stderr[-3000:]
    out = json.loads((tmp_path / "metrics" / "pretrain" / "moco.json").read_text())
    assert out["epochs"] == 3 and (tmp_path / "data" / "models" / "moco.pt").is_file()


# ----------------------------------------------------------------- VOC under DDP, synchronised BN
def _voc(voc_dir):
    from selfsup.core import dist
    from selfsup.core.config import build
    from selfsup.detection.config import VocCfg
    from selfsup.detection.detector import run_voc
    from selfsup.models.backbones import build_backbone

    cfg = build(VocCfg, {"enabled": True, "embedded": {"trainval_images": 12, "test_images": 8}, "steps": 4, "warmup_steps": 1,
                         "lr_steps": [3], "bn": "sync", "batch_size": 4}, "voc")
    calls = []
    fwd = dist.GlobalBatchNorm.forward

    def counted(self, x):
        calls.append(self.training)
        return fwd(self, x)

    dist.GlobalBatchNorm.forward = counted
    torch.manual_seed(0)
    out = run_voc(build_backbone("smallcnn", 1), voc_dir, [0.3], [0.35], cfg, 0, torch.device("cpu"))
    return {"rank": dist.rank(), "summary": out and out["summary"], "sync_bn_train_calls": sum(calls)}


def test_global_batch_norm_equals_one_bn_over_the_whole_batch():
    r0, r1 = run_ranks(_global_bn, 2)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5, requires_grad=True)
    bn = nn.BatchNorm2d(3)
    y = bn(x)
    (y * torch.arange(8.0).view(8, 1, 1, 1)).sum().backward()
    for r, out in enumerate((r0, r1)):
        torch.testing.assert_close(out["y"], y.detach()[4 * r:4 * (r + 1)], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["grad"], x.grad[4 * r:4 * (r + 1)], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out["running_var"], bn.running_var, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["weight_grad"], bn.weight.grad, rtol=1e-5, atol=1e-5)


def _global_bn():
    from selfsup.core import dist

    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5)
    r = dist.rank()
    xs = x[4 * r:4 * (r + 1)].clone().requires_grad_(True)
    bn = dist.sync_batch_norm(nn.Sequential(nn.BatchNorm2d(3)), torch.device("cpu"))[0]
    assert isinstance(bn, dist.GlobalBatchNorm)
    y = bn(xs)
    (y * torch.arange(8.0)[4 * r:4 * (r + 1)].view(4, 1, 1, 1)).sum().backward()
    dist.all_reduce(bn.weight.grad)  # what DDP would do (sum here: the one-process loss is a sum)
    return {"y": y.detach(), "grad": xs.grad, "running_var": bn.running_var, "weight_grad": bn.weight.grad}


def test_voc_fine_tunes_under_ddp_with_synchronised_bn(tmp_path):
    from selfsup.core.config import build
    from selfsup.detection.config import VocCfg
    from selfsup.detection.voc_data import prepare_voc

    prepare_voc(build(VocCfg, {"enabled": True, "embedded": {"trainval_images": 12, "test_images": 8}}, "voc"), 0, 0.2,
                tmp_path / "voc")
    r0, r1 = run_ranks(_voc, 2, (str(tmp_path / "voc"),))
    assert r0["summary"]["steps"] == 4 and 0 <= r0["summary"]["map50"] <= 100
    assert r1["summary"] is None  # rank 0 evaluates
    assert r0["sync_bn_train_calls"] > 0 and r0["sync_bn_train_calls"] == r1["sync_bn_train_calls"]

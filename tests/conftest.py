import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfsup.core.config import load_config  # noqa: E402
from selfsup.data.prepared import load_prepared  # noqa: E402
from selfsup.data.sources import prepare  # noqa: E402


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """The embedded digits dataset in the uniform on-disk format: its folder."""
    out = tmp_path_factory.mktemp("digits") / "dataset"
    cfg = load_config({"methods": ["random"]})
    prepare(cfg.dataset, 0, out)
    return out


@pytest.fixture(scope="session")
def digits(digits_folder):
    """The embedded digits dataset, loaded (memory-mapped)."""
    return load_prepared(digits_folder)


def make_cfg(**over):
    """A config dict: defaults plus nested overrides, e.g. make_cfg(deepcluster={"epochs": 2})."""
    base = {"methods": ["deepcluster", "random", "supervised"], "device": "cpu"}
    for k, v in over.items():
        base[k] = v
    return load_config(base)


def knn_after_pretrain(name, digits, tmp_path, **over):
    """(weighted kNN-200 top-1 on digits' test split of ``name``'s backbone after pretraining with the
    overrides ``over``, its per-epoch history): the "beats random init" check of the method tests."""
    import torch

    from selfsup.models.features import extract_features
    from selfsup.eval.knn import knn_eval
    from selfsup.engine.loop import pretrain

    cpu = torch.device("cpu")
    m, hist = pretrain(make_cfg(methods=[name], **over), name, digits, tmp_path / name / "ck.pt")
    tr = extract_features(m.backbone, digits.train, digits.meta, cpu)
    te = extract_features(m.backbone, digits.test, digits.meta, cpu)
    return knn_eval(tr, digits.train.y, te, digits.test.y, 200, 0.07, 10)["top1"], hist


def assert_resume_is_exact(cfg, name, data, tmp_path, kill_after=1, kill_at_batch=None):
    """Train ``name`` uninterrupted, then again killed and resumed: after epoch ``kill_after``, or,
    with ``kill_at_batch``, in the middle of epoch ``kill_after`` + 1 right after batch
    ``kill_at_batch`` (the config must checkpoint at every step: log_every 1,
    checkpoint_minutes 0). The resumed run must continue (not restart) and end bit-identical
    (history and every state_dict entry: backbone, heads, banks, queues), and its saved model
    file must be byte-identical. Returns the resumed history."""
    import torch

    from selfsup.engine.loop import pretrain, save_backbone

    ref, ref_hist = pretrain(cfg, name, data, tmp_path / "ref" / "ckpt.pt")

    class Killed(Exception):
        pass

    def kill(epoch, record):
        if kill_at_batch is None and epoch == kill_after:
            raise Killed

    def kill_step(epoch, batch):
        if kill_at_batch is not None and (epoch, batch) == (kill_after, kill_at_batch):
            raise Killed

    ck = tmp_path / "run" / "ckpt.pt"
    with pytest.raises(Killed):
        pretrain(cfg, name, data, ck, on_epoch_end=kill, on_step=kill_step)
    saved = torch.load(ck, weights_only=False)
    if kill_at_batch is None:
        assert saved["epoch"] == kill_after and saved["batch"] == 0  # the last finished epoch was saved
    else:
        assert (saved["epoch"], saved["batch"]) == (kill_after, kill_at_batch)  # mid-epoch position
    ran = []
    res, hist = pretrain(cfg, name, data, ck, on_epoch_end=lambda e, r: ran.append(e))
    assert ran == list(range(kill_after + 1, len(ref_hist) + 1))  # resumed, not restarted
    save_backbone(tmp_path / "ref.pt", ref, cfg, data.meta)
    save_backbone(tmp_path / "res.pt", res, cfg, data.meta)
    assert (tmp_path / "ref.pt").read_bytes() == (tmp_path / "res.pt").read_bytes()  # DVC sees the same file
    def untimed(h):  # wall-clock fields differ between runs; everything else must not
        return {k: v for k, v in h.items() if not (k == "seconds" or k.endswith(("_seconds", "_per_s")))}

    assert [untimed(h) for h in hist] == [untimed(h) for h in ref_hist]
    for (k, v), w in zip(ref.state_dict().items(), res.state_dict().values()):
        assert torch.equal(v, w), k
    return hist

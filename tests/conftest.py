import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfsup.config import load_config  # noqa: E402
from selfsup.data import load_prepared, prepare  # noqa: E402


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The embedded digits dataset in the uniform on-disk format."""
    out = tmp_path_factory.mktemp("digits") / "dataset"
    cfg = load_config({"methods": ["random"]})
    prepare(cfg.dataset, 0, out)
    return load_prepared(out)


def make_cfg(**over):
    """A config dict: defaults plus nested overrides, e.g. make_cfg(deepcluster={"epochs": 2})."""
    base = {"methods": ["deepcluster", "random", "supervised"], "device": "cpu"}
    for k, v in over.items():
        base[k] = v
    return load_config(base)


def assert_resume_is_exact(cfg, name, data, tmp_path, kill_after=1):
    """Train ``name`` uninterrupted, then again killed after epoch ``kill_after`` and resumed:
    the resumed run must continue (not restart) and end bit-identical (history and every
    state_dict entry: backbone, heads, banks, queues). Returns the resumed history."""
    import torch

    from selfsup.train import pretrain

    ref, ref_hist = pretrain(cfg, name, data, tmp_path / "ref" / "ckpt.pt")

    class Killed(Exception):
        pass

    def kill(epoch, record):
        if epoch == kill_after:
            raise Killed

    ck = tmp_path / "run" / "ckpt.pt"
    with pytest.raises(Killed):
        pretrain(cfg, name, data, ck, on_epoch_end=kill)
    assert torch.load(ck, weights_only=False)["epoch"] == kill_after  # the last finished epoch was saved
    ran = []
    res, hist = pretrain(cfg, name, data, ck, on_epoch_end=lambda e, r: ran.append(e))
    assert ran == list(range(kill_after + 1, len(ref_hist) + 1))  # resumed, not restarted
    def untimed(h):  # wall-clock fields differ between runs; everything else must not
        return {k: v for k, v in h.items() if not (k == "seconds" or k.endswith(("_seconds", "_per_s")))}

    assert [untimed(h) for h in hist] == [untimed(h) for h in ref_hist]
    for (k, v), w in zip(ref.state_dict().items(), res.state_dict().values()):
        assert torch.equal(v, w), k
    return hist

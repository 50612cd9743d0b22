"""The download stage's sources and the uniform on-disk format."""
import io
import tarfile
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_cfg
from selfsup.data.prepared import load_prepared
from selfsup.data.sources import DatasetUnavailable, prepare
from selfsup.core.io import InputError


def test_digits_split_is_stratified_and_deterministic(tmp_path, digits):
    m = digits.meta
    assert (m["n_train"], m["n_test"]) == (1437, 360)
    assert digits.train.x.shape == (1437, 8, 8, 1) and digits.train.x.dtype == np.uint8
    assert np.all(np.abs(np.array(m["counts"]["test"]) - 36) <= 1)  # stratified: ~36 per class
    assert len(m["source_sha256"]) == 64 and 0 < m["mean"][0] < 1
    again = prepare(make_cfg().dataset, 0, tmp_path / "again")
    assert again == m
    np.testing.assert_array_equal(load_prepared(tmp_path / "again").test.y, digits.test.y)


def _png(color, size=6):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_imagefolder_tar_with_unlabelled_images(tmp_path):
    arc = tmp_path / "toy.tar.xz"
    with tarfile.open(arc, "w:xz") as tar:
        for split, n in (("train", 3), ("test", 2)):
            for c, col in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
                for i in range(n):
                    _add(tar, f"toy/{split}/{c}/{i}.png", _png(col))
        _add(tar, "toy/train/loose.png", _png((0, 255, 0)))  # no class folder -> label -1
    cfg = make_cfg(dataset={"name": "imagefolder", "path": str(arc), "root": str(tmp_path / "raw")})
    meta = prepare(cfg.dataset, 0, tmp_path / "ds")
    d = load_prepared(tmp_path / "ds")
    assert meta["classes"] == ["cat", "dog"]
    assert meta["counts"]["train"] == [3, 3] and meta["counts"]["train_unlabeled"] == 1
    assert sorted(d.train.y.tolist()) == [-1, 0, 0, 0, 1, 1, 1]
    assert meta["format"] == "files" and meta["image_size"] is None  # an index, no pixels copied
    assert not list((tmp_path / "ds").glob("*.npy"))
    assert d.train.sizes.tolist() == [[6, 6]] * 7
    red = [d.train.read(i) for i in range(len(d.train)) if d.train.y[i] == 0]
    assert all(r.shape == (3, 6, 6) and (r[0] == 255).all() and (r[2] == 0).all() for r in red)
    assert len(meta["source_sha256"]) == 64
    # image_size > 0: decoded once into memory-mapped arrays of that size
    cfg = make_cfg(dataset={"name": "imagefolder", "path": str(arc), "root": str(tmp_path / "raw"), "image_size": 4})
    meta = prepare(cfg.dataset, 0, tmp_path / "ds4")
    d = load_prepared(tmp_path / "ds4")
    assert meta["format"] == "array" and d.train.x.shape == (7, 4, 4, 3) and isinstance(d.train.x, np.memmap)
    assert (d.train.x[d.train.y == 0][..., 0] == 255).all() and meta["mean"][1] == pytest.approx(255 / 7 / 255)


@pytest.mark.parametrize("filtered", [True, False], ids=["data_filter", "older_python"])
@pytest.mark.parametrize("evil", ["path", "symlink"])
def test_imagefolder_tar_refuses_escaping_members(tmp_path, monkeypatch, filtered, evil):
    """tarfile's data filter (Python >= 3.10.12 / 3.11.4) or, without it, our member-by-member check:
    a member or a link leaving the extraction folder fails naming the archive, and nothing lands."""
    if not filtered:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    arc = tmp_path / "evil.tar"
    with tarfile.open(arc, "w") as tar:
        _add(tar, "evil/train/a/0.png", _png((1, 2, 3)))
        if evil == "path":
            _add(tar, "../../escaped.png", _png((1, 2, 3)))
        else:
            link = tarfile.TarInfo("evil/train/a/1.png")
            link.type, link.linkname = tarfile.SYMTYPE, "../../../../../etc/passwd"
            tar.addfile(link)
    cfg = make_cfg(dataset={"name": "imagefolder", "path": str(arc), "root": str(tmp_path / "raw")})
    with pytest.raises(InputError, match="evil.tar.*escapes"):
        prepare(cfg.dataset, 0, tmp_path / "ds")
    assert not (tmp_path / "escaped.png").exists() and not (tmp_path.parent / "escaped.png").exists()
    assert not list((tmp_path / "raw").glob("*evil*"))  # the atomic folder (.evil-*.tmp) is gone too


def test_torchvision_offline_gives_a_clear_message(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*a, **kw):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    cfg = make_cfg(dataset={"name": "cifar10", "root": str(tmp_path)})
    with pytest.raises(DatasetUnavailable, match="offline.*imagefolder"):
        prepare(cfg.dataset, 0, tmp_path / "ds")
    # no download allowed and nothing on disk: torchvision's own check, wrapped
    cfg = make_cfg(dataset={"name": "svhn", "root": str(tmp_path), "download": False})
    with pytest.raises(DatasetUnavailable, match="dataset.name=svhn"):
        prepare(cfg.dataset, 0, tmp_path / "ds")


def test_missing_imagefolder_path(tmp_path):
    cfg = make_cfg(dataset={"name": "imagefolder", "path": str(tmp_path / "nope")})
    with pytest.raises(DatasetUnavailable, match="dataset.path"):
        prepare(cfg.dataset, 0, tmp_path / "ds")


def test_imagenet_layout_is_indexed_not_copied(tmp_path):
    """dataset.name=imagenet: train/<wnid>/*.JPEG + val/<wnid>/*.JPEG, images of different sizes;
    the index holds paths, labels and sizes; eval geometry is resize 256 + centre crop 224."""
    from PIL import Image

    from selfsup.data.loader import eval_batches

    root = tmp_path / "ILSVRC2012"
    sizes = {}
    for split, n in (("train", 3), ("val", 2)):
        for w, wnid in enumerate(("n01440764", "n01443537")):
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):
                hw = (300 + 17 * i, 260 + 31 * w)
                Image.new("RGB", hw[::-1], (40 * i, 100, 200 * w)).save(root / split / wnid / f"{wnid}_{i}.JPEG")
                sizes[f"{split}/{wnid}/{wnid}_{i}.JPEG"] = list(hw)
    cfg = make_cfg(dataset={"name": "imagenet", "path": str(root)})
    meta = prepare(cfg.dataset, 0, tmp_path / "ds")
    assert meta["classes"] == ["n01440764", "n01443537"] and (meta["n_train"], meta["n_test"]) == (6, 4)
    assert meta["format"] == "files" and meta["image_size"] is None
    d = load_prepared(tmp_path / "ds")
    assert d.train.y.tolist() == [0, 0, 0, 1, 1, 1]
    for i in range(len(d.train)):
        assert d.train.sizes[i].tolist() == sizes[d.train.paths[i].decode()]
    (batch,) = list(eval_batches(d.test, batch_size=8, workers=0))
    assert batch.shape == (4, 3, 224, 224) and batch.dtype == torch.uint8
    with pytest.raises(DatasetUnavailable, match="neither train/ \\+ val/"):
        prepare(make_cfg(dataset={"name": "imagenet", "path": str(tmp_path)}).dataset, 0, tmp_path / "x")

"""Small I/O helpers: atomic writes, feature tables, hashing, seeds, devices.

Every file a stage writes goes through ``atomic_path``: written under a temporary
name in the same folder, then renamed, so a killed stage never leaves a
half-written output that a later stage (or DVC) would take as valid.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that need it: the report stages never load it (torch + torchvision cost ~3 s of start-up per stage: benchmarks/imports.py).


class InputError(RuntimeError):
    """A missing or corrupt input file (the message names it)."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temp folder beside ``path``; swap it in for ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing (run the stage that writes it first: `dvc repro`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: corrupt JSON ({e})") from e


def save_torch(path: str | Path, obj: Any) -> None:
    """torch.save, atomically and byte-reproducibly: written to a buffer first, because torch.save
    to a path names the zip archive's folder after the (here random, temporary) file name, so the
    same weights would give a different file (and DVC would re-run everything downstream)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)  # archive folder "archive": fixed
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getbuffer())


def load_torch(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing (run the stage that writes it first: `dvc repro`)")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # torch's errors for truncated files
        raise InputError(f"{path}: corrupt checkpoint ({e})") from e


# --------------------------------------------------------------------------- feature tables
def write_features(path: str | Path, feats: np.ndarray, labels: np.ndarray) -> None:
    """Parquet table: ``index`` int64, ``label`` int64, ``feature`` fixed-size list<float32>."""
    feats = np.ascontiguousarray(feats, dtype=np.float32)  # (N, D)
    n, d = feats.shape
    col = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), d)
    table = pa.table({"index": np.arange(n, dtype=np.int64), "label": labels.astype(np.int64), "feature": col})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_features(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``write_features``: (feats (N, D) float32, labels (N,) int64)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing (run the stage that writes it first: `dvc repro`)")
    try:
        table = pq.read_table(path)
        col = table.column("feature").combine_chunks()
        d = col.type.list_size
        feats = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32, copy=False)
        labels = table.column("label").to_numpy()
    except (pa.ArrowInvalid, KeyError, OSError) as e:
        raise InputError(f"{path}: corrupt feature file ({e})") from e
    return feats, labels


# --------------------------------------------------------------------------- misc
def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_digest(folder: str | Path) -> str:
    """sha256 of a folder's content: every file's relative path and bytes, in sorted order.

    Never its mtimes: a copy that drops them (tar, ``cp`` without ``-p``, some file systems, a DVC
    checkout) must key the same results. Reading the bytes costs about a second per GB (the
    VOC2007 devkit is under 1 GB); the embedded detection set is a few MB."""
    h = hashlib.sha256()
    root = Path(folder)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(root).as_posix()}\0".encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()[:16]


class ResultCache:
    """Per-item results of a stage that loops over items (``evaluate`` and ``voc``: one entry per method;
    ``table1``: one per row), kept in a ``persist`` folder and reused while the item's key is unchanged.

    Why: one DVC stage for all methods costs one process start instead of one per method (each start
    imports torch and torchvision, about 4 s here: benchmarks/imports.py), while a new model of one method still re-runs only
    that method's detector. The key must digest everything the result depends on (the stage builds it
    from the model file's content, the params, the code, the data), as ``selfsup.engine.loop.run_key`` does
    for resumed training. Only the main process writes.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def get(self, item: str, key: str) -> Any | None:
        f = self.folder / f"{item}.json"
        if not f.is_file():
            return None
        entry = read_json(f)
        return entry["result"] if entry.get("key") == key else None

    def put(self, item: str, key: str, result: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / f"{item}.json", {"key": key, "result": result})


def derive_seed(seed: int, *keys: Any) -> int:
    """A child seed from the run seed and any keys (stage, epoch, ...), stable across runs."""
    blob = json.dumps([seed, *keys], default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little") & 0x7FFFFFFF


def resolve_device(name: str) -> "torch.device":
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; under torchrun with several processes, ``auto`` and
    ``cuda`` mean this process's GPU (``LOCAL_RANK``)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device: {name!r} asked for but CUDA is not available")
    if dev.type == "cuda" and dev.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def repo_root() -> Path:
    """The project root: ``$DVC_ROOT`` under DVC, else the folder above cwd holding dvc.yaml and
    params.yaml (a sub-folder's own dvc.yaml has no params.yaml beside it).

    Queued ``dvc exp run`` executes in a temporary copy under ``.dvc/tmp/exps/``;
    paths inside it are mapped back to the real repository so that the MLflow
    store is shared by every experiment.
    """
    root = Path(os.environ.get("DVC_ROOT") or _find_up(Path.cwd()))
    parts = root.resolve().parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root.resolve()


def _find_up(start: Path) -> Path:
    for p in [start, *start.parents]:
        if (p / "dvc.yaml").is_file() and (p / "params.yaml").is_file():
            return p
    return start

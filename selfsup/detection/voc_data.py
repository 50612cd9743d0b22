"""PASCAL VOC detection data: the devkit's XML annotations, the sources, and a torch dataset.

Layout (the devkit's, one folder per year)::

    VOCdevkit/VOC2007/Annotations/<id>.xml      one <annotation> per image
    VOCdevkit/VOC2007/ImageSets/Main/<set>.txt  image ids of trainval / test / ...
    VOCdevkit/VOC2007/JPEGImages/<id>.jpg

The ``voc_data`` stage writes ``data/voc/manifest.json`` naming the year folders and
image sets of the trainval and test splits:

- ``voc.dataset: embedded`` (default, offline): ``compose_embedded`` draws digits
  of the *held-out* digits split (the ``download`` stage's test split, same seed and
  ``dataset.test_fraction``) onto larger noisy canvases and writes them in the devkit
  layout under ``data/voc/VOCdevkit/VOC2007``: the backbones were pre-trained on the
  digits train split, so no digit instance a backbone saw appears here. The held-out
  digits are split in two disjoint halves, one for trainval objects and one for test.
- ``voc2007`` / ``voc2007+2012``: torchvision's ``VOCDetection`` downloaders (md5
  checked) into ``voc.root``, or a local ``voc.path`` VOCdevkit folder; test is
  always VOC2007 test.

Boxes: the XML holds 1-based inclusive pixel coordinates. Training uses continuous
0-based coordinates ``(xmin - 1, ymin - 1, xmax, ymax)`` (detectron2's conversion);
the evaluator (selfsup/detection/voc_ap.py) maps detections back and scores them against
the XML boxes exactly as the devkit does (``+1`` in widths).
"""
from __future__ import annotations

import urllib.error
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from selfsup.data.config import DatasetCfg
from selfsup.detection.config import VocCfg
from selfsup.data.sources import DatasetUnavailable, digits_source
from selfsup.core.io import InputError, atomic_dir, derive_seed, read_json, write_json

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


# --------------------------------------------------------------------------- XML
@dataclass
class VocObject:
    name: str
    bbox: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax: 1-based, inclusive (devkit)
    pose: str = "Unspecified"
    truncated: int = 0
    difficult: int = 0


@dataclass
class VocAnnotation:
    filename: str
    width: int
    height: int
    depth: int
    objects: list[VocObject] = field(default_factory=list)
    folder: str = ""
    segmented: int = 0


def _text(node: ET.Element, tag: str, path: Path, default: str | None = None) -> str:
    el = node.find(tag)
    if el is None or el.text is None or not el.text.strip():
        if default is not None:
            return default
        raise InputError(f"{path}: malformed VOC annotation: <{node.tag}> has no <{tag}>")
    return el.text.strip()


def _num(node: ET.Element, tag: str, path: Path, default: str | None = None) -> float:
    s = _text(node, tag, path, default)
    try:
        return float(s)
    except ValueError:
        raise InputError(f"{path}: malformed VOC annotation: <{tag}> is {s!r}, not a number") from None


def parse_voc_xml(path: str | Path) -> VocAnnotation:
    """Read one devkit annotation; a malformed file raises InputError naming it.

    The devkit's fields: folder, filename, size (width, height, depth), segmented, and per
    object name, pose, truncated, difficult, bndbox (xmin, ymin, xmax, ymax). truncated and
    difficult default to 0 where absent (some VOC2012 objects lack them); the devkit's
    own reader casts coordinates with int(), which a few fractional VOC2012 boxes break,
    so they are read as floats.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise InputError(f"{path}: malformed VOC annotation ({e})") from e
    except OSError as e:
        raise InputError(f"{path}: unreadable VOC annotation ({e})") from e
    if root.tag != "annotation":
        raise InputError(f"{path}: malformed VOC annotation: root is <{root.tag}>, not <annotation>")
    size = root.find("size")
    if size is None:
        raise InputError(f"{path}: malformed VOC annotation: no <size>")
    ann = VocAnnotation(
        filename=_text(root, "filename", path), width=int(_num(size, "width", path)),
        height=int(_num(size, "height", path)), depth=int(_num(size, "depth", path, "3")),
        folder=_text(root, "folder", path, ""), segmented=int(_num(root, "segmented", path, "0")),
    )
    for obj in root.findall("object"):
        bb = obj.find("bndbox")
        if bb is None:
            raise InputError(f"{path}: malformed VOC annotation: an <object> has no <bndbox>")
        box = tuple(_num(bb, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
        if not (box[0] <= box[2] and box[1] <= box[3]):
            raise InputError(f"{path}: malformed VOC annotation: box {box} has xmin > xmax or ymin > ymax")
        flags = {t: int(_num(obj, t, path, "0")) for t in ("truncated", "difficult")}
        if any(v not in (0, 1) for v in flags.values()):
            raise InputError(f"{path}: malformed VOC annotation: truncated/difficult must be 0 or 1, got {flags}")
        ann.objects.append(VocObject(_text(obj, "name", path), box, _text(obj, "pose", path, "Unspecified"),  # type: ignore[arg-type]
                                     **flags))
    return ann


def write_voc_xml(path: str | Path, ann: VocAnnotation) -> None:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = ann.folder
    ET.SubElement(root, "filename").text = ann.filename
    src = ET.SubElement(root, "source")
    ET.SubElement(src, "database").text = "selfsup embedded digits"
    size = ET.SubElement(root, "size")
    for t, v in (("width", ann.width), ("height", ann.height), ("depth", ann.depth)):
        ET.SubElement(size, t).text = str(v)
    ET.SubElement(root, "segmented").text = str(ann.segmented)
    for o in ann.objects:
        el = ET.SubElement(root, "object")
        ET.SubElement(el, "name").text = o.name
        ET.SubElement(el, "pose").text = o.pose
        ET.SubElement(el, "truncated").text = str(o.truncated)
        ET.SubElement(el, "difficult").text = str(o.difficult)
        bb = ET.SubElement(el, "bndbox")
        for t, v in zip(("xmin", "ymin", "xmax", "ymax"), o.bbox):
            ET.SubElement(bb, t).text = str(int(v))
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8")


def read_image_set(year_dir: Path, image_set: str) -> list[str]:
    f = year_dir / "ImageSets" / "Main" / f"{image_set}.txt"
    if not f.is_file():
        raise InputError(f"{f}: missing VOC image set")
    ids = [line.split()[0] for line in f.read_text().splitlines() if line.strip()]
    if not ids:
        raise InputError(f"{f}: empty VOC image set")
    return ids


# --------------------------------------------------------------------------- embedded default
def _place(rng: np.random.Generator, box_hw: tuple[int, int], canvas_hw: tuple[int, int],
           truncate: bool) -> tuple[int, int]:
    """Top-left corner of a (h, w) glyph box: inside the canvas, or 30-60% past one edge."""
    (h, w), (H, W) = box_hw, canvas_hw
    y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
    if truncate:
        side = int(rng.integers(4))
        cut = lambda n: max(1, int(round(n * rng.uniform(0.3, 0.6))))  # noqa: E731
        if side == 0:
            x = -cut(w)
        elif side == 1:
            x = W - w + cut(w)
        elif side == 2:
            y = -cut(h)
        else:
            y = H - h + cut(h)
    return y, x


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def compose_embedded(cfg: VocCfg, seed: int, test_fraction: float, out_dir: str | Path) -> dict[str, Any]:
    """Write the embedded VOC-format digits set to ``out_dir/VOCdevkit/VOC2007`` (deterministic)."""
    from PIL import Image

    e = cfg.embedded
    held = digits_source(DatasetCfg(test_fraction=test_fraction), seed).test  # the download stage's test split
    classes = [f"digit{c}" for c in e.classes]
    keep = np.isin(held.y, e.classes)
    xs, ys = held.x[keep, :, :, 0], held.y[keep]  # (N, 8, 8) uint8, (N,)
    rng = np.random.default_rng(derive_seed(seed, "voc-embedded"))
    order = rng.permutation(len(ys))
    half = len(order) // 2
    pools = {"trainval": order[:half], "test": order[half:]}  # disjoint digit instances
    out = Path(out_dir)
    year = out / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (year / sub).mkdir(parents=True, exist_ok=True)
    stats = {"objects": 0, "truncated": 0, "difficult": 0}
    for split, n_img in (("trainval", e.trainval_images), ("test", e.test_images)):
        pool, k = pools[split], 0
        ids = []
        for i in range(n_img):
            img_id = f"{split[:2]}{i:05d}"
            H, W = (int(v) for v in rng.integers(e.canvas[0], e.canvas[1] + 1, size=2))
            canvas = rng.integers(0, 48, size=(H, W)).astype(np.float32)  # dark noise background
            boxes: list[tuple[int, int, int, int]] = []  # 0-based [x0, y0, x1, y1) of the visible glyph
            objects = []
            for _ in range(int(rng.integers(1, e.max_objects + 1))):
                j = pool[k % len(pool)]
                k += 1
                s = int(rng.choice(e.scales))
                glyph = np.kron(xs[j].astype(np.float32), np.ones((s, s), np.float32))  # (8s, 8s)
                ink_r, ink_c = np.nonzero(glyph > 0)
                glyph = glyph[ink_r.min(): ink_r.max() + 1, ink_c.min(): ink_c.max() + 1]  # tight box
                truncated = bool(rng.random() < e.truncated_p)
                difficult = bool(rng.random() < e.difficult_p)
                for _try in range(20):
                    y, x = _place(rng, glyph.shape, (H, W), truncated)
                    vis = (max(x, 0), max(y, 0), min(x + glyph.shape[1], W), min(y + glyph.shape[0], H))
                    if all(_iou(vis, b) < 0.1 for b in boxes):
                        break
                else:
                    continue  # no free spot: fewer objects on this canvas
                g = glyph[vis[1] - y: vis[3] - y, vis[0] - x: vis[2] - x] * (0.3 if difficult else 1.0)
                region = canvas[vis[1]: vis[3], vis[0]: vis[2]]
                np.maximum(region, g, out=region)
                boxes.append(vis)
                objects.append(VocObject(
                    f"digit{int(ys[j])}", (vis[0] + 1, vis[1] + 1, vis[2], vis[3]),  # devkit: 1-based inclusive
                    truncated=int(truncated), difficult=int(difficult)))
                stats["objects"] += 1
                stats["truncated"] += int(truncated)
                stats["difficult"] += int(difficult)
            Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "L").save(
                year / "JPEGImages" / f"{img_id}.jpg", quality=95)
            write_voc_xml(year / "Annotations" / f"{img_id}.xml",
                          VocAnnotation(f"{img_id}.jpg", W, H, 1, objects, folder="VOC2007"))
            ids.append(img_id)
        (year / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return {"classes": classes, "stats": stats}


# --------------------------------------------------------------------------- sources
def _year_dir(cfg: VocCfg, year: str, image_sets: tuple[str, ...]) -> Path:
    """The VOC<year> folder: a local voc.path, or torchvision's (md5-checked) download into voc.root."""
    if cfg.path:
        d = Path(cfg.path) / f"VOC{year}"
        if not d.is_dir():
            raise DatasetUnavailable(f"voc.path: {d} not found (expected a VOCdevkit folder holding VOC{year}/)")
        return d
    import torchvision.datasets as tvd

    root = Path(cfg.root)
    root.mkdir(parents=True, exist_ok=True)
    for image_set in image_sets:
        try:
            tvd.VOCDetection(str(root), year=year, image_set=image_set, download=cfg.download)
        except (urllib.error.URLError, OSError) as e:
            raise DatasetUnavailable(
                f"voc.dataset={cfg.dataset}: could not download VOC{year} {image_set} to {root} ({e}). This "
                f"machine looks offline: copy the VOC tar archives torchvision expects into {root} "
                f"(e.g. VOCtrainval_06-Nov-2007.tar, VOCtest_06-Nov-2007.tar), or set voc.path to an "
                f"extracted VOCdevkit folder") from e
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise DatasetUnavailable(f"voc.dataset={cfg.dataset}: {e} (root {root}; set voc.download=true)") from e
    return root / "VOCdevkit" / f"VOC{year}"


def prepare_voc(cfg: VocCfg, seed: int, test_fraction: float, out_dir: str | Path) -> dict[str, Any]:
    """Write ``out_dir/manifest.json`` (and, for the embedded set, the images) and return it."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if not cfg.enabled:  # no detection transfer: nothing drawn or downloaded
            man = {"source": "off (voc.enabled: false)", "classes": [], "trainval": [], "test": [],
                   "n_trainval": 0, "n_test": 0}
            write_json(tmp / "manifest.json", man)
            return man
        if cfg.dataset == "embedded":
            made = compose_embedded(cfg, seed, test_fraction, tmp)
            classes = made["classes"]
            rel = {"dir": "VOCdevkit/VOC2007", "relative_to": "manifest"}
            trainval, test = [{**rel, "set": "trainval"}], [{**rel, "set": "test"}]
            source = "embedded digits (held-out split)"
        else:
            classes = list(VOC_CLASSES)
            y07 = str(_year_dir(cfg, "2007", ("trainval", "test")))
            trainval = [{"dir": y07, "relative_to": "cwd", "set": "trainval"}]
            if cfg.dataset == "voc2007+2012":
                y12 = str(_year_dir(cfg, "2012", ("trainval",)))
                trainval.append({"dir": y12, "relative_to": "cwd", "set": "trainval"})
            test = [{"dir": y07, "relative_to": "cwd", "set": "test"}]
            source = f"torchvision.datasets.VOCDetection ({cfg.dataset})" if not cfg.path else f"VOCdevkit:{cfg.path}"
        manifest: dict[str, Any] = {"dataset": cfg.dataset, "source": source, "classes": classes,
                                    "trainval": trainval, "test": test}
        # read every annotation now: a malformed file or an unknown class fails here, naming it
        for split in ("trainval", "test"):
            recs = load_split(manifest, split, tmp)
            names = {o.name for _, a in recs for o in a.objects}
            unknown = sorted(names - set(classes))
            if unknown:
                raise InputError(f"{split}: objects of unknown classes {unknown[:5]} (known: {classes})")
            manifest[f"n_{split}"] = len(recs)
            manifest[f"objects_{split}"] = sum(len(a.objects) for _, a in recs)
            manifest[f"difficult_{split}"] = sum(o.difficult for _, a in recs for o in a.objects)
            manifest[f"truncated_{split}"] = sum(o.truncated for _, a in recs for o in a.objects)
        write_json(tmp / "manifest.json", manifest)
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    return read_json(Path(folder) / "manifest.json")


def load_split(manifest: dict[str, Any], split: str, folder: str | Path) -> list[tuple[Path, VocAnnotation]]:
    """[(image path, annotation)] of a split, in image-set order."""
    out = []
    for entry in manifest[split]:
        d = Path(entry["dir"])
        if entry["relative_to"] == "manifest":
            d = Path(folder) / d
        for img_id in read_image_set(d, entry["set"]):
            ann = parse_voc_xml(d / "Annotations" / f"{img_id}.xml")
            out.append((d / "JPEGImages" / ann.filename, ann))
    return out


# --------------------------------------------------------------------------- torch dataset
class VocDetection:
    """(image float (C, H, W) in [0, 1], target) for torchvision's detection models.

    target: boxes float (K, 4) continuous 0-based xyxy, labels int64 (K,) in 1..C (0 is
    background), difficult bool (K,). ``keep_difficult=False`` drops difficult objects
    (py-faster-rcnn's training); images left with no object are kept (background only).
    """

    def __init__(self, records: list[tuple[Path, VocAnnotation]], classes: list[str], channels: int,
                 keep_difficult: bool = True, flip: bool = False, seed: int = 0):
        self.records = records
        self.cidx = {c: i + 1 for i, c in enumerate(classes)}
        self.mode = {1: "L", 3: "RGB"}[channels]
        self.keep_difficult = keep_difficult
        self.flip = flip
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[Any, dict[str, Any]]:
        import torch
        from PIL import Image

        path, ann = self.records[i]
        try:
            with Image.open(path) as im:
                img = torch.from_numpy(np.array(im.convert(self.mode), np.float32) / 255.0)
        except OSError as e:
            raise InputError(f"{path}: unreadable image ({e})") from e
        img = img[None] if img.ndim == 2 else img.permute(2, 0, 1)  # (C, H, W)
        objs = [o for o in ann.objects if self.keep_difficult or not o.difficult]
        boxes = torch.tensor([[o.bbox[0] - 1, o.bbox[1] - 1, o.bbox[2], o.bbox[3]] for o in objs],
                             dtype=torch.float32).reshape(-1, 4)  # (K, 4) 0-based continuous
        if self.flip and self.rng.random() < 0.5:
            w = img.shape[-1]
            img = img.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        target = {"boxes": boxes, "labels": torch.tensor([self.cidx[o.name] for o in objs], dtype=torch.int64),
                  "difficult": torch.tensor([bool(o.difficult) for o in objs], dtype=torch.bool)}
        return img, target

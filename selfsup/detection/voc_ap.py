"""PASCAL VOC detection AP, as the official devkit (and its Python port in py-faster-rcnn /
detectron2's ``pascal_voc_evaluation.py``) computes it.

- ``voc_ap(rec, prec, use_07_metric)``: VOC2007's 11-point interpolated AP (the mean over
  recall thresholds 0, 0.1, ..., 1 of the best precision at recall >= t), or the area
  under the monotone precision envelope (VOC2010+).
- ``voc_eval_class``: detections of one class sorted by score; each one is matched to the
  ground-truth box of its image with the highest IoU. IoU above the threshold with a
  non-difficult box: true positive, unless that box was already matched (a duplicate: false
  positive). "Above" is ``iou_compare``: ``gt``, IoU > threshold, as the Python port
  (py-faster-rcnn's ``voc_eval.py``, detectron2's evaluator, which MoCo's table reports:
  the default), or ``ge``, IoU >= threshold, as the MATLAB devkit's ``VOCevaldet.m``
  (``ovmax>=VOCopts.minoverlap``); they differ only for an IoU exactly at the threshold. Matched to a difficult box: neither (ignored). Otherwise a
  false positive. Recall is over the non-difficult boxes only.
  IoU uses the devkit's inclusive pixel convention (``x2 - x1 + 1``), boxes 1-based.
- ``evaluate_detections``: per-class AP50 (11-point and area), the COCO-style AP (the mean
  over IoU 0.50:0.05:0.95) and AP75. Following detectron2's PascalVOCDetectionEvaluator,
  which MoCo's VOC table reports, those use one VOC AP (11-point for VOC2007, param
  ``voc.ap_metric``), not COCO's 101-point interpolation. Numbers are in percent.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

IOU_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2))  # 0.50, 0.55, ..., 0.95


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool = False) -> float:
    """AP from a recall / precision curve (both ordered by descending score)."""
    rec, prec = np.asarray(rec, np.float64), np.asarray(prec, np.float64)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):  # the devkit's 11 thresholds (floating-point arange, as it does)
            p = prec[rec >= t].max() if (rec >= t).any() else 0.0
            ap += p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(len(mpre) - 1, 0, -1):  # the precision envelope (monotone non-increasing)
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]  # points where recall changes
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def box_iou_devkit(box: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """IoU of one box (4,) with boxes (K, 4), 1-based inclusive pixel coordinates (devkit's +1)."""
    ixmin = np.maximum(gts[:, 0], box[0])
    iymin = np.maximum(gts[:, 1], box[1])
    ixmax = np.minimum(gts[:, 2], box[2])
    iymax = np.minimum(gts[:, 3], box[3])
    iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
    ih = np.maximum(iymax - iymin + 1.0, 0.0)
    inter = iw * ih
    uni = ((box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
           + (gts[:, 2] - gts[:, 0] + 1.0) * (gts[:, 3] - gts[:, 1] + 1.0) - inter)
    return inter / uni


def voc_eval_class(
    dets: Sequence[tuple[int, float, Sequence[float]]],
    gts: dict[int, tuple[np.ndarray, np.ndarray]],
    iou_thresh: float = 0.5,
    iou_compare: str = "gt",
) -> tuple[np.ndarray, np.ndarray, int]:
    """Recall and precision curves of one class.

    dets: (image index, score, box xyxy 1-based inclusive) for every detection of the class.
    gts: image index -> (boxes (K, 4) 1-based inclusive, difficult bool (K,)) of the class.
    Returns (rec, prec, npos), npos = number of non-difficult ground-truth boxes.
    """
    npos = int(sum(int((~d.astype(bool)).sum()) for _, d in gts.values()))
    if not dets:
        return np.zeros(0), np.zeros(0), npos
    scores = np.array([s for _, s, _ in dets], np.float64)
    # descending score; a stable sort so ties keep input order (the devkit's argsort is unstable)
    order = np.argsort(-scores, kind="stable")
    matched = {i: np.zeros(len(b), bool) for i, (b, _) in gts.items()}
    tp = np.zeros(len(dets))
    fp = np.zeros(len(dets))
    for d, j in enumerate(order):
        img, _, box = dets[j]
        box = np.asarray(box, np.float64)
        ovmax, jmax = -np.inf, -1
        if img in gts and len(gts[img][0]):
            ov = box_iou_devkit(box, np.asarray(gts[img][0], np.float64))
            jmax = int(ov.argmax())
            ovmax = float(ov[jmax])
        if ovmax > iou_thresh or (iou_compare == "ge" and ovmax == iou_thresh):
            if not gts[img][1][jmax]:
                if not matched[img][jmax]:
                    tp[d] = 1.0
                    matched[img][jmax] = True
                else:
                    fp[d] = 1.0  # a duplicate detection of an already-found object
            # matched to a difficult object: neither true nor false positive
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos) if npos else np.full_like(tp, np.nan)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)  # the devkit's guard against 0/0
    return rec, prec, npos


# the columns of a per-class row, in the order of metrics/voc/<m>_classes.csv (a stored result read back
# has its keys sorted: the stage writes these columns in this order either way)
CLASS_COLUMNS = ("class", "ap50", "ap50_area", "ap", "ap75", "n_gt", "n_difficult", "n_det")


def evaluate_detections(
    detections: list[dict[str, np.ndarray]],
    ground_truth: list[dict[str, np.ndarray]],
    classes: Sequence[str],
    ap_metric: str = "11point",
    iou_compare: str = "gt",
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Dataset-level VOC metrics (percent) and a per-class table.

    detections[i]: boxes (D, 4) xyxy 1-based inclusive, scores (D,), labels (D,) in 1..C.
    ground_truth[i]: boxes (K, 4) xyxy 1-based inclusive (the XML values), labels (K,),
    difficult (K,) bool. The means skip classes with no non-difficult ground truth
    (the devkit would give NaN); their rows say so.
    """
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} detection lists for {len(ground_truth)} images")
    use07 = ap_metric == "11point"
    rows = []
    for c, name in enumerate(classes, start=1):
        gts = {}
        for i, g in enumerate(ground_truth):
            m = np.asarray(g["labels"]) == c
            gts[i] = (np.asarray(g["boxes"], np.float64).reshape(-1, 4)[m], np.asarray(g["difficult"], bool)[m])
        dets = [(i, float(s), b) for i, d in enumerate(detections)
                for b, s, lab in zip(np.asarray(d["boxes"]).reshape(-1, 4), d["scores"], d["labels"]) if lab == c]
        row: dict[str, Any] = {"class": name}
        aps: dict[float, float] = {}
        for t in IOU_THRESHOLDS:
            rec, prec, npos = voc_eval_class(dets, gts, float(t), iou_compare)
            aps[t] = 100.0 * voc_ap(rec, prec, use07) if npos else np.nan
            if t == 0.5:
                row["ap50"] = 100.0 * voc_ap(rec, prec, True) if npos else np.nan
                row["ap50_area"] = 100.0 * voc_ap(rec, prec, False) if npos else np.nan
        row["ap"] = float(np.mean([aps[t] for t in IOU_THRESHOLDS]))
        row["ap75"] = aps[0.75]
        row["n_gt"] = npos
        row["n_difficult"] = int(sum(int(d.sum()) for _, d in gts.values()))
        row["n_det"] = len(dets)
        rows.append(row)

    def mean(k: str) -> float:
        v = [r[k] for r in rows if r["n_gt"]]
        return float(np.mean(v)) if v else float("nan")

    summary = {"map50": mean("ap50"), "map50_area": mean("ap50_area"), "ap": mean("ap"), "ap75": mean("ap75"),
               "ap_metric": ap_metric}
    return summary, rows

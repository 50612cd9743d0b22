"""The ``voc:`` section: the VOC detection transfer's data, detector, fine-tuning and evaluation
(``selfsup/detection/``). Parsed when first read (``selfsup.core.config.SECTIONS``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from selfsup.core.config import ConfigError, non_negative, one_of, positive


VOC_DATASETS = ("embedded", "voc2007", "voc2007+2012")


VOC_ARCHS = ("c4", "fpn")


VOC_BN = ("frozen", "train", "sync")


VOC_AP = ("11point", "area")


@dataclass
class EmbeddedVocCfg:
    """The offline default: digits of the held-out digits split on larger canvases (selfsup/detection/voc_data.py)."""

    classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # digit classes, named digit<k>
    trainval_images: int = 80
    test_images: int = 40
    canvas: list[int] = field(default_factory=lambda: [36, 48])  # side in [lo, hi] px (height, width drawn apart)
    scales: list[int] = field(default_factory=lambda: [2, 3])  # 8x8 digits upscaled by one of these (nearest)
    max_objects: int = 3  # 1..max_objects digits per image
    truncated_p: float = 0.15  # an object placed partly outside the canvas (box clipped, truncated=1)
    difficult_p: float = 0.15  # an object drawn at low contrast (difficult=1)

    def check(self, p: str) -> None:
        if not self.classes or len(set(self.classes)) != len(self.classes) or not all(0 <= c <= 9 for c in self.classes):
            raise ConfigError(f"{p}.classes: need distinct digits 0..9, got {self.classes}")
        positive(p, self, "trainval_images", "test_images", "max_objects")
        lo_hi = self.canvas
        if len(lo_hi) != 2 or not 16 <= lo_hi[0] <= lo_hi[1]:
            raise ConfigError(f"{p}.canvas: need [lo, hi] with 16 <= lo <= hi, got {lo_hi}")
        if not self.scales or any(s < 1 or 8 * s > lo_hi[0] for s in self.scales):
            raise ConfigError(f"{p}.scales: each in [1, canvas[0] / 8], got {self.scales}")
        for n in ("truncated_p", "difficult_p"):
            if not 0.0 <= getattr(self, n) <= 1.0:
                raise ConfigError(f"{p}.{n}: a probability in [0, 1], got {getattr(self, n)}")


@dataclass
class VocCfg:
    """Detection transfer (stages voc_data, voc; selfsup/detection/voc_data.py, detection.py, voc_eval.py)."""

    # off unless a preset whose paper reports VOC detection (MoCo) or the digits default turns it on:
    # the voc stage then trains no detector and the voc_data stage fetches nothing
    enabled: bool = False
    # data (the voc_data stage reads only these five)
    dataset: str = "embedded"  # embedded | voc2007 | voc2007+2012 (trainval; test is always VOC2007 test)
    root: str = "data/raw/voc"  # torchvision's VOC download / extraction folder
    path: str = ""  # a local VOCdevkit folder (VOC2007/, VOC2012/) instead of downloading
    download: bool = True
    embedded: EmbeddedVocCfg = field(default_factory=EmbeddedVocCfg)
    # detector
    arch: str = "c4"  # resnets: c4 (layer4 as the box head) | fpn; smallcnn / alexnet_bn: one map + MLP head
    bn: str = "frozen"  # frozen | train | sync (sync needs a torch.distributed multi-device run)
    freeze_at: int = 0  # stages frozen from the stem (detectron2 default 2; MoCo 0)
    min_size: int = 48  # GeneralizedRCNNTransform (VOC: 480-800 train / 800 test in MoCo's detectron2)
    max_size: int = 48
    anchor_sizes: list[int] = field(default_factory=lambda: [16, 24, 32])
    aspect_ratios: list[float] = field(default_factory=lambda: [1.0, 2.0])  # height / width
    rpn_proposals: list[int] = field(default_factory=lambda: [200, 50])  # post-NMS, train / test (VOC: 2000 / 1000)
    roi_batch: int = 32  # sampled RoIs per image (VOC: 512)
    detections: int = 20  # kept per test image (VOC: 100)
    # RPN head of the one-map detectors (smallcnn / alexnet_bn): 0 = torchvision's RPNHead (3x3 conv
    # in -> in channels); > 0 = a 3x3 conv to this width (CPU budget: the in -> in conv costs more
    # than the whole smallcnn trunk). ResNets always use torchvision's.
    rpn_channels: int = 32
    representation: int = 128  # MLP box head width (smallcnn / alexnet_bn; VOC Fast R-CNN: 4096 / 1024)
    train_difficult: bool = True  # detectron2 (MoCo) trains on difficult objects; py-faster-rcnn does not
    flip: bool = False  # horizontal flip in training (VOC: true; digits: a mirrored digit is another glyph)
    # fine-tuning (MoCo: batch 16, lr 0.02, 24k iterations, steps 18k/22k, warm-up 100)
    steps: int = 120
    batch_size: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    warmup_steps: int = 20
    lr_steps: list[int] = field(default_factory=lambda: [100])
    # evaluation: AP of the COCO-style mean over IoU 0.5:0.95 and AP75 use this VOC AP
    # (detectron2's PascalVOCDetectionEvaluator, which MoCo reports: 11-point on VOC2007)
    ap_metric: str = "11point"
    # detections below this score are dropped before evaluation: detectron2's 0.05 (its
    # MODEL.ROI_HEADS.SCORE_THRESH_TEST, the setting of MoCo's table); 0 keeps all (low-score
    # detections only add to the end of the PR curve)
    score_thresh: float = 0.05
    iou_compare: str = "gt"  # gt: IoU > threshold (Python devkit port, detectron2) | ge: >= (MATLAB devkit)

    def check(self, p: str) -> None:
        one_of(p, "dataset", self.dataset, VOC_DATASETS)
        if self.path and self.dataset == "embedded":
            raise ConfigError(f"{p}.path: a VOCdevkit path needs voc.dataset voc2007 or voc2007+2012, not embedded")
        one_of(p, "arch", self.arch, VOC_ARCHS)
        one_of(p, "bn", self.bn, VOC_BN)
        one_of(p, "ap_metric", self.ap_metric, VOC_AP)
        one_of(p, "iou_compare", self.iou_compare, ("gt", "ge"))
        positive(p, self, "min_size", "max_size", "roi_batch", "detections", "representation", "steps", "batch_size", "lr")
        non_negative(p, self, "rpn_channels", "freeze_at", "momentum", "weight_decay", "warmup_steps", "score_thresh")
        if self.min_size > self.max_size:
            raise ConfigError(f"{p}.min_size: {self.min_size} above max_size {self.max_size}")
        if not self.anchor_sizes or any(a <= 0 for a in self.anchor_sizes):
            raise ConfigError(f"{p}.anchor_sizes: need positive sizes, got {self.anchor_sizes}")
        if not self.aspect_ratios or any(a <= 0 for a in self.aspect_ratios):
            raise ConfigError(f"{p}.aspect_ratios: need positive ratios, got {self.aspect_ratios}")
        if len(self.rpn_proposals) != 2 or any(n <= 0 for n in self.rpn_proposals):
            raise ConfigError(f"{p}.rpn_proposals: need [train, test] > 0, got {self.rpn_proposals}")
        if any(not 0 < s < self.steps for s in self.lr_steps) or self.lr_steps != sorted(self.lr_steps):
            raise ConfigError(f"{p}.lr_steps: need increasing steps in (0, {self.steps}), got {self.lr_steps}")
        if not self.score_thresh < 1:
            raise ConfigError(f"{p}.score_thresh: must be < 1, got {self.score_thresh}")

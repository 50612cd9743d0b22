"""voc: Faster R-CNN on each method's backbone, fine-tuned on VOC trainval, VOC07-test AP (one stage for
every method: ``selfsup.detection.detector.transfer_all``; a method whose model, params, code and data are
unchanged reuses its result from data/voc_runs/).

Writes metrics/voc/<m>.json (map50: VOC2007 11-point AP50; map50_area; ap: mean over IoU
0.5:0.95; ap75; percent) and the per-class table metrics/voc/<m>_classes.csv.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from selfsup.detection.detector import transfer_all  # noqa: E402
from selfsup.detection.voc_ap import CLASS_COLUMNS  # noqa: E402
from selfsup.core.io import atomic_path, read_json, resolve_device, write_json  # noqa: E402
from selfsup.core.launch import distributed  # noqa: E402
from selfsup.core.stage import Paths, setup  # noqa: E402

cfg = setup(parse_methods=False)
distributed(cfg)  # several processes: DDP fine-tuning (voc.bn: sync synchronises BN), rank 0 evaluates
P = Paths()
t0 = time.perf_counter()
meta = read_json(P.dataset / "meta.json")  # the pre-training normalisation the backbones expect
models = {m: P.model(m) for m in cfg.methods} if cfg.voc.enabled else {}  # voc.enabled false: no detector
for name, out, reused in transfer_all(cfg, models, P.voc, meta["mean"], meta["std"], resolve_device(cfg.device),
                                      P.voc_runs):
    if out is None:  # not rank 0
        continue
    with atomic_path(P.voc_classes(name)) as tmp:
        pd.DataFrame(out["per_class"], columns=list(CLASS_COLUMNS)).to_csv(tmp, index=False, float_format="%.4f")
    write_json(P.metrics("voc", name), out["summary"])
    s = out["summary"]
    if "skipped" in s:
        print(f"voc {name}: {s['skipped']}")
        continue
    print(f"voc {name}: mAP50 {s['map50']:.1f} (11-point) / {s['map50_area']:.1f} (area), AP {s['ap']:.1f}, "
          f"AP75 {s['ap75']:.1f}; " + ("reused" if reused else f"{s['seconds']:.1f}s"))
print(f"voc: {len(models)} methods in {time.perf_counter() - t0:.1f}s" if cfg.voc.enabled else "voc: off (voc.enabled: false)")

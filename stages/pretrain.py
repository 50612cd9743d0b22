"""pipelines/<method>/dvc.yaml:pretrain: the training loop (resumable at any step), final encoder, per-epoch history, the live MLflow run."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from selfsup.data import load_prepared  # noqa: E402
from selfsup.dist import is_main  # noqa: E402
from selfsup.io import atomic_path, repo_root, write_json  # noqa: E402
from selfsup.launch import distributed  # noqa: E402
from selfsup.pictures import method_pictures, save_png  # noqa: E402
from selfsup.stage import Paths, check_stage_upstream, setup  # noqa: E402
from selfsup.tracking import LiveRun, run_params  # noqa: E402
from selfsup.train import pretrain, save_backbone  # noqa: E402

name = sys.argv[1]
cfg = setup(parse_methods=[name])
distributed(cfg)  # under torchrun when dist asks for several processes
P = Paths()
check_stage_upstream(P.root, name, cfg.methods[name])
data = load_prepared(P.dataset)
t0 = time.perf_counter()
# the MLflow run of (DVC experiment, method), live while it trains; later stages' numbers reach it
# through the report
tracker = LiveRun(repo_root(), cfg.mlflow.experiment, name, cfg.mlflow.enabled)
method, history = pretrain(cfg, name, data, P.ckpt(name), tracker=tracker, tracker_params=run_params(cfg, name))
if not is_main():  # rank 0 writes the outputs; every rank holds the same weights
    sys.exit(0)
save_backbone(P.model(name), method, cfg, data.meta)
# what the method draws (the colouriser's outputs; a skipped method: its reason), under reports/
pics = method_pictures(method, data, next(method.parameters()).device, getattr(method.cfg, "picture_images", 8),
                       cfg.dataset.resize_size, cfg.dataset.crop_size)
for fname, img in pics.items():
    save_png(P.reports / fname, img, scale=1 if method.skipped else max(1, 96 // (img.shape[0] // 3)))
tracker.log_artifacts([P.reports / f for f in pics], artifact_path="pictures")
hist = pd.DataFrame(history, columns=None if history else ["epoch", "loss", "seconds"])
with atomic_path(P.history(name)) as tmp:
    hist.to_csv(tmp, index=False)
final = {k: v for k, v in (history[-1] if history else {}).items() if k != "epoch"}
write_json(P.metrics("pretrain", name), {
    "epochs": len(history),
    "backbone": method.backbone.arch_name,  # <m>.backbone or model.backbone: the report names it per row
    # sum over epochs, so a resumed run reports its total training time, not just the tail
    "seconds": float(hist["seconds"].sum()) if history else time.perf_counter() - t0,
    **{f"final_{k}": v for k, v in final.items()},
    **({"skipped": method.skipped} if method.skipped else {}),
})
tracker.end()

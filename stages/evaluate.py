"""pipelines/<method>/dvc.yaml:evaluate: every evaluation of the frozen encoder in one process (``selfsup.frozen``): its
features (data/features/<m>/), weighted kNN, PCA-whitening + k-means, the linear probe / SVM / per-layer
probes; each step writes its own metrics file (metrics/{extract,knn,cluster,linear}/<m>.json). With
several processes the ranks share the extraction and rank 0 evaluates."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfsup.frozen import evaluate_frozen  # noqa: E402
from selfsup.io import resolve_device, write_json  # noqa: E402
from selfsup.launch import distributed  # noqa: E402
from selfsup.stage import Paths, setup  # noqa: E402

name = sys.argv[1]
cfg = setup(parse_methods=False)
distributed(cfg)
P = Paths()
out = evaluate_frozen(cfg, name, P, resolve_device(cfg.device))
if out is None:  # not rank 0
    sys.exit(0)
for step, metrics in out.items():
    write_json(P.metrics(step, name), metrics)
knn, lin = out["knn"], out["linear"]
print(f"evaluate {name}: kNN top-1 {knn.get('top1', float('nan')):.1f}, linear top-1 {lin.get('top1', float('nan')):.1f}, "
      f"NMI {out['cluster'].get('nmi', float('nan')):.3f}; "
      f"{sum(m.get('seconds', 0.0) for m in out.values()):.1f}s")

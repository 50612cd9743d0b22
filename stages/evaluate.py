"""evaluate: every evaluation of every method's frozen encoder in one process (``selfsup.eval.evaluate_all.evaluate_all``):
its features (data/features/<m>/), weighted kNN, PCA-whitening + k-means, the linear probe / SVM /
per-layer probes, end-to-end fine-tuning; each step writes its own metrics file
(metrics/{extract,knn,cluster,linear,finetune}/<m>.json). A method whose model and evaluation keys are
unchanged reuses its metrics (data/eval_runs/). With several processes the ranks share the extraction
and rank 0 evaluates."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfsup.eval.evaluate_all import evaluate_all  # noqa: E402
from selfsup.core.io import resolve_device, write_json  # noqa: E402
from selfsup.core.launch import distributed  # noqa: E402
from selfsup.core.stage import Paths, setup  # noqa: E402

cfg = setup(parse_methods=False)
distributed(cfg)
P = Paths()
t0 = time.perf_counter()
for name, out, reused in evaluate_all(cfg, list(cfg.methods), P, resolve_device(cfg.device)):
    for step, metrics in out.items():
        write_json(P.metrics(step, name), metrics)
    knn, lin = out["knn"], out["linear"]
    if "skipped" in out["extract"]:  # the method did not train on this data
        print(f"evaluate {name}: {out['extract']['skipped']}")
        continue
    print(f"evaluate {name}: kNN top-1 {knn.get('top1', float('nan')):.1f}, linear top-1 "
          f"{lin.get('top1', float('nan')):.1f}, NMI {out['cluster'].get('nmi', float('nan')):.3f}; "
          + ("reused" if reused else f"{sum(m.get('seconds', 0.0) for m in out.values()):.1f}s"))
print(f"evaluate: {len(cfg.methods)} methods in {time.perf_counter() - t0:.1f}s")

"""pretrain: the training loop of the methods named (DVC: one per stage, ``pretrain-<m>``; none named: every
method) in one process (``selfsup.engine.pretrain_all.train_all``; resumable at
any step): its final encoder, per-epoch history, pictures, metrics and live MLflow run. A method whose
checkpoint key is unchanged resumes its finished run and trains nothing.

``python stages/pretrain.py [method ...]`` trains only those methods (outside DVC: one method by hand)."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfsup.core.config import ConfigError  # noqa: E402
from selfsup.data.prepared import load_prepared  # noqa: E402
from selfsup.core.dist import is_main  # noqa: E402
from selfsup.core.io import repo_root  # noqa: E402
from selfsup.core.launch import distributed  # noqa: E402
from selfsup.engine.pretrain_all import train_all  # noqa: E402
from selfsup.core.stage import Paths, check_stage_upstream, setup  # noqa: E402

# the blocks of the methods named only (a DVC stage trains one): importing every method's file would
# cost each stage the imports of all the others
cfg = setup(parse_methods=sys.argv[1:] or True)
names = sys.argv[1:] or list(cfg.methods)
if unknown := [m for m in names if m not in cfg.methods]:
    raise ConfigError(f"stages/pretrain.py: {', '.join(unknown)} not in params.yaml methods ({', '.join(cfg.methods)})")
P = Paths()
check_stage_upstream(P.root, cfg)
distributed(cfg)  # under torchrun when dist asks for several processes
data = load_prepared(P.dataset)
t0 = time.perf_counter()
for name, metrics, steps in train_all(cfg, names, data, P, repo_root()):
    if is_main():
        P.ckpt(name).parent.mkdir(parents=True, exist_ok=True)  # the stage's (persist) output, also for a baseline
        what = (f"skipped: {metrics['skipped']}" if "skipped" in metrics
                else f"trained {steps} batches now" if steps
                else "reused (its finished run resumed)" if metrics["epochs"] else "no training (a baseline)")
        print(f"pretrain {name}: {metrics['epochs']} epochs, {metrics['seconds']:.1f}s; {what}")
if is_main():
    print(f"pretrain: {len(names)} methods in {time.perf_counter() - t0:.1f}s")

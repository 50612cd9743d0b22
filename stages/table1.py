"""table1: InstDisc's Table 1, every row in one process (``selfsup.eval.instdisc_table1.run_rows``: pretrain + extract
+ kNN + linear + SVM per row, a row reused while its key holds), then reports/instdisc_table1.md + .csv
beside the paper's figures."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfsup.data.prepared import load_prepared  # noqa: E402
from selfsup.core.dist import is_main  # noqa: E402
from selfsup.core.io import atomic_path, write_json  # noqa: E402
from selfsup.core.launch import distributed  # noqa: E402
from selfsup.report.results import table1_files  # noqa: E402
from selfsup.core.stage import Paths, setup  # noqa: E402
from selfsup.eval.instdisc_table1 import run_rows  # noqa: E402

cfg = setup(parse_methods=["instdisc"])
P = Paths()
results = {}
if cfg.table1_rows():
    distributed(cfg)
    data = load_prepared(P.dataset)
    for name, out, reused in run_rows(cfg, data, P.root / "data" / "table1"):
        if out is not None:  # rank 0
            write_json(P.metrics("table1", name), out)
            results[name] = out
            print(f"table1 {name}: kNN {out['knn_top1']:.1f}, SVM {out['svm_top1']:.1f}, "
                  f"linear {out['linear_top1']:.1f}; " + ("reused" if reused else f"{out['seconds']:.1f}s"))
else:  # the sweep is off (instdisc_table1.run, the method list): nothing to train, the page says why
    (P.root / "data" / "table1").mkdir(parents=True, exist_ok=True)  # the stage's (persist) output
if is_main():
    for fname, text in table1_files(cfg, results).items():
        with atomic_path(P.reports / fname) as tmp:
            tmp.write_text(text)
    print((P.reports / "instdisc_table1.md").read_text())

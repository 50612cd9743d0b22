"""table1_report: reports/instdisc_table1.md + .csv from the table1@<row> metrics, beside the paper's."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfsup.io import atomic_path, read_json  # noqa: E402
from selfsup.stage import Paths, setup  # noqa: E402
from selfsup.report import table1, table1_markdown  # noqa: E402

cfg = setup(parse_methods=False)
P = Paths()
t1 = cfg.instdisc_table1
results = {r: read_json(P.metrics("table1", r)) for r in t1.rows}
if not results:  # a preset without InstDisc empties the sweep (instdisc_table1.rows: {})
    for name, text in (("instdisc_table1.md", "# InstDisc Table 1 (Wu et al. 2018)\n\nNot run: "
                        "instdisc_table1.rows is empty in params.yaml.\n"), ("instdisc_table1.csv", "row\n")):
        with atomic_path(P.reports / name) as tmp:
            tmp.write_text(text)
    sys.exit(0)
table = table1(results)
capped = any(r["nce_m_used"] != r["nce_m"] for r in results.values())
notes = [
    f"Ours: dataset {cfg.dataset.name}, backbone {cfg.model.backbone}, the `instdisc` params block with each "
    f"row's softmax / nce_m, {table['epochs'].max()} epochs; test-split top-1.",
    f"knn_top1: weighted kNN, k = {t1.knn_k} (capped at the training-set size), votes exp(sim / T) with T the "
    "row's training temperature, on the normalised 128-d embedding re-extracted with the test transform "
    "(the paper's protocol, lemniscate's test.py; it reads the memory bank where we re-extract).",
    f"svm_top1: linear SVM (C = {cfg.svm.c}) on the L2-normalised backbone features, as the paper's linear "
    f"column; linear_top1: the linear probe of the main table ({cfg.linear.epochs} epochs).",
    "Paper numbers: selfsup/paper_results.yaml (source and whether each was checked against the paper's text).",
    "paper_*: Wu et al. 2018, Table 1: CIFAR-10, ResNet-18, 128-d embedding, 200 epochs.",
]
if capped:
    notes.append("nce_m is capped below the training-set size (uniform noise over N images; the method refuses "
                 "m >= N): rows whose m was capped say so.")
with atomic_path(P.reports / "instdisc_table1.md") as tmp:
    tmp.write_text(table1_markdown(table, notes))
with atomic_path(P.reports / "instdisc_table1.csv") as tmp:
    table.to_csv(tmp, float_format="%.4f")
print(table1_markdown(table, notes))

"""report: reports/results.md + .csv + per-epoch plots, and one MLflow run per method."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfsup.core.io import atomic_path, repo_root  # noqa: E402
from selfsup.report.results import (  # noqa: E402
    collect, load_histories, load_paper_results, markdown_table, paper_columns, plot_curves, probes_table, results_table,
    to_markdown, voc_markdown)
from selfsup.core.stage import Paths, setup  # noqa: E402
from selfsup.core.tracking import flatten, log_runs, run_params  # noqa: E402

cfg = setup(parse_methods=False)
P = Paths()
t0 = time.perf_counter()
allm = collect(P.root / "metrics", cfg.methods)
# ours beside the published number each method's row meets (report.paper: ids in selfsup/report/paper_results.yaml)
published = load_paper_results()
table = paper_columns(results_table(allm, cfg.knn.k), cfg.report.paper, cfg.report.paper_note, published)
probes = probes_table(allm, cfg.report.paper, published)
notes = [
    f"Dataset: {cfg.dataset.name}, backbone: {cfg.model.backbone}"
    + ("" if "backbone" not in table else " (the backbone column names the methods' own, <method>.backbone)")
    + "; test-split numbers except NMI/ARI/cluster_acc.",
    f"knn<k>_top1: weighted kNN (cosine, votes exp(sim/{cfg.knn.temperature})), k capped at the training-set size;"
    " knn_top5 for the first k. knn_paper_top1: the method's own paper protocol (knn_paper_protocol), where set.",
    "paper / ours / diff: the published number (paper_protocol: its protocol, backbone and setting; "
    "UNVERIFIED: not checked against the paper's text; paper_source: table, row, column) beside ours under the "
    "same protocol (knn: knn_paper_top1; linear SVM: svm_top1; linear and per-layer rows: linear_top1, "
    "the frozen-feature probe on the final features; fine-tune rows: finetune_top1), diff = ours - paper; where no "
    "paper reports the setting, "
    "paper_protocol says why.",
    "pretext_acc: a pretext method's accuracy on its own task (RotNet: the rotation), on the last epoch's "
    "training batches.",
    f"svm_top1: linear SVM (LinearSVC, C = {cfg.svm.c}) on the L2-normalised final features.",
    f"linear_top1: linear probe on frozen features, {cfg.linear.epochs} epochs, fixed schedule, no model selection.",
    f"finetune_top1: the whole encoder + a linear classifier fine-tuned on the labelled training split "
    f"({cfg.finetune.epochs} epochs, {cfg.finetune.optimizer}, layer decay {cfg.finetune.layer_decay} on ViTs)"
    + ("" if cfg.finetune.enabled else " (off: finetune.enabled is false)") + ".",
    "nmi/ari/cluster_acc: k-means (k = "
    f"{cfg.cluster.k or 'number of classes'}) on PCA-{cfg.whiten.pca_dim}-whitened training features vs labels.",
]
if any(allm[m]["pretrain"].get("skipped") for m in cfg.methods):
    notes.append("skipped: the method cannot run on this dataset (the reason); its encoder stays at its init, "
                 "so the evaluate and voc stages skip it and its numbers are left blank.")
if "colorization" in cfg.methods:
    notes.append("Colourisation's pictures (originals, grayscale inputs, colourised outputs with the annealed mean): "
                 "reports/colorization.png.")
notes += cfg.report.notes  # a preset's title and its differences from the paper (presets apply)
notes.append("voc_ap50 / voc_ap / voc_ap75: off (voc.enabled: false)." if not cfg.voc.enabled else
    f"voc_ap50 / voc_ap / voc_ap75: Faster R-CNN ({cfg.voc.arch} for ResNets, BN {cfg.voc.bn}) fine-tuned on "
    f"{cfg.voc.dataset} trainval, VOC2007-style test: AP50 with the VOC2007 11-point metric, AP averaged over "
    f"IoU 0.5:0.95 and AP75 with the {cfg.voc.ap_metric} VOC AP (detectron2 / MoCo); per class: reports/voc.md.")
voc_md = voc_markdown(P.root / "metrics", list(cfg.methods) if cfg.voc.enabled else [], [
    f"Data: {cfg.voc.dataset}; detector: Faster R-CNN, arch {cfg.voc.arch} (ResNets), BN {cfg.voc.bn}, "
    f"{cfg.voc.steps} SGD steps of {cfg.voc.batch_size} images, lr {cfg.voc.lr}.",
    "Difficult objects are neither true nor false positives (devkit); '–': no non-difficult object of the class.",
    f"AP (0.5:0.95) and AP75 use the {cfg.voc.ap_metric} VOC AP, as detectron2's VOC evaluator (MoCo's table)."])
with atomic_path(P.reports / "voc.md") as tmp:
    tmp.write_text(voc_md)
with atomic_path(P.reports / "probes.md") as tmp:
    if probes.empty:
        tmp.write_text("# Per-layer linear probes\n\nNo method ran them: set `probe.layers` ([all] or stage names) in "
                       "params.yaml.\n")
    else:
        tmp.write_text(markdown_table(probes, "Per-layer linear probes (test top-1)", [
            f"Each stage's activations average-pooled to ~{cfg.probe.target_dim} dims, standardised on the training "
            f"split, a linear classifier ({cfg.probe.epochs} epochs, lr {cfg.probe.lr}), on centre-crop features "
            "extracted once (the papers train on random crops and test on 10 crops: selfsup/eval/layer_probes.py).",
            "'(paper)' rows: the published per-layer numbers of the row's report.paper id (selfsup/report/paper_results.yaml)."]))
with atomic_path(P.reports / "probes.csv") as tmp:
    probes.to_csv(tmp, float_format="%.4f")
with atomic_path(P.reports / "results.md") as tmp:
    tmp.write_text(to_markdown(table, notes))
with atomic_path(P.reports / "results.csv") as tmp:
    table.to_csv(tmp, float_format="%.4f")
histories = load_histories(P.root / "plots" / "pretrain", cfg.methods)
pngs = plot_curves(histories, P.reports / "plots")
print(to_markdown(table, notes))

if cfg.mlflow.enabled:
    params = {m: run_params(cfg, m) for m in cfg.methods}
    finals = {}
    for m in cfg.methods:
        row = {f"{c}": float(v) for c, v in table.loc[m].items()
               if isinstance(v, (int, float)) and v == v}  # numbers only, no NaN
        for stage, d in allm[m].items():
            row.update({f"{stage}.{k}": float(v) for k, v in flatten(d).items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        finals[m] = row
    log_runs(repo_root(), cfg.mlflow.experiment, params, finals, histories,
             [P.reports / "results.md", P.reports / "results.csv", P.reports / "voc.md", P.reports / "probes.md",
              *pngs])
print(f"report: {time.perf_counter() - t0:.1f}s")

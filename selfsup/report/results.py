"""The results table (method x metrics) and the per-epoch plots, from the stages' metric files."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from selfsup.core.io import InputError, read_json  # noqa: E402

STAGES = ("pretrain", "extract", "cluster", "knn", "linear", "finetune", "voc")


def collect(metrics_dir: Path, methods: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """{method: {stage: metrics dict}} for every method and stage (missing file: InputError)."""
    return {m: {s: read_json(metrics_dir / s / f"{m}.json") for s in STAGES} for m in methods}


def results_table(all_metrics: dict[str, dict[str, dict[str, Any]]], knn_ks: list[int] | None = None) -> pd.DataFrame:
    """One row per method: kNN top-1 per k, linear top-1, NMI, ARI, cluster accuracy, pretrain seconds."""
    rows = []
    for m, st in all_metrics.items():
        knn, lin, clu, pre = st["knn"], st["linear"], st["cluster"], st["pretrain"]
        ks = knn_ks or sorted({int(k.split("_")[0][1:]) for k in knn if k.startswith("k") and k.endswith("_top1")},
                              reverse=True)
        row: dict[str, Any] = {"method": m, "backbone": pre.get("backbone", "")}
        for k in ks:
            row[f"knn{k}_top1"] = knn.get(f"k{k}_top1", math.nan)
        row["knn_top5"] = knn.get(f"k{ks[0]}_top5", math.nan) if ks else math.nan
        # the method's own paper protocol (knn.paper in params.yaml), where one is set
        row["knn_paper_top1"] = knn.get("paper_top1", math.nan)
        row["knn_paper_protocol"] = knn.get("paper_protocol", "")
        row["linear_top1"] = lin.get("top1", math.nan)
        row["svm_top1"] = lin.get("svm_top1", math.nan)
        row["finetune_top1"] = st.get("finetune", {}).get("top1", math.nan)  # end-to-end fine-tuning
        for layer, r in (lin.get("probes") or {}).get("layers", {}).items():  # per-layer probes, when run
            row[f"probe_{layer}_top1"] = r.get("top1", math.nan)
        row["nmi"] = clu.get("nmi", math.nan)
        row["ari"] = clu.get("ari", math.nan)
        row["cluster_acc"] = clu.get("acc", math.nan)
        # detection transfer (stage voc): VOC2007 11-point AP50, mean AP over IoU 0.5:0.95, AP75
        voc = st.get("voc", {})
        row["voc_ap50"] = voc.get("map50", math.nan)
        row["voc_ap"] = voc.get("ap", math.nan)
        row["voc_ap75"] = voc.get("ap75", math.nan)
        # a pretext task's accuracy on its own task (RotNet's rotations), last epoch's training batches
        row["pretext_acc"] = 100.0 * pre.get("final_pretext_acc", math.nan)
        row["pretrain_epochs"] = pre.get("epochs", 0)
        row["pretrain_seconds"] = pre.get("seconds", math.nan)
        if pre.get("skipped"):  # not trained, not evaluated: every number blank, the reason instead
            row = {k: (math.nan if isinstance(v, float) and k != "pretrain_seconds" else v) for k, v in row.items()}
        row["skipped"] = pre.get("skipped", "")
        rows.append(row)
    table = pd.DataFrame(rows).set_index("method")
    if table["backbone"].nunique() <= 1:  # one backbone for all: the notes name it
        table = table.drop(columns="backbone")
    return table if table["skipped"].any() else table.drop(columns="skipped")


def markdown_table(table: pd.DataFrame, title: str, notes: list[str], index: str = "method",
                   formats: dict[str, str] | None = None) -> str:
    """A titled markdown table with notes; numbers as ``formats[col]`` (default one decimal),
    NaN and empty strings as an en dash."""
    formats = formats or {}
    cols = list(table.columns)
    lines = [f"| {index} | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in table.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, str):
                cells.append(v.replace("weighted kNN ", "") or "–")
            elif isinstance(v, float) and math.isnan(v):
                cells.append("–")
            else:
                cells.append(formats.get(c, "{:.1f}").format(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([f"# {title}", "", *lines, "", *[f"- {n}" for n in notes], ""])


def to_markdown(table: pd.DataFrame, notes: list[str]) -> str:
    return markdown_table(table, "Results", notes, "method",
                          {"nmi": "{:.3f}", "ari": "{:.3f}", "pretrain_epochs": "{:.0f}"})


def load_histories(plots_dir: Path, methods: list[str]) -> dict[str, pd.DataFrame]:
    out = {}
    for m in methods:
        f = plots_dir / f"{m}.csv"
        if not f.is_file():
            raise InputError(f"{f}: missing (run `dvc repro pretrain-<m>`)")
        out[m] = pd.read_csv(f)
    return out


def plot_curves(histories: dict[str, pd.DataFrame], out_dir: Path) -> list[Path]:
    """One PNG per per-epoch quantity, a line per method that logged it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = sorted({c for h in histories.values() for c in h.columns if c != "epoch"})
    written = []
    for key in keys:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m, h in histories.items():
            if key in h.columns and h[key].notna().any():
                ax.plot(h["epoch"], h[key], marker="o", ms=3, label=m)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        fig.savefig(path, dpi=80, metadata={"Software": None})  # no version stamp: stable bytes
        plt.close(fig)
        written.append(path)
    return written


def voc_markdown(metrics_dir: Path, methods: list[str], notes: list[str]) -> str:
    """reports/voc.md: per-class AP50 (VOC2007 11-point) per method, then every VOC metric."""
    tables = {}
    for m in methods:
        f = metrics_dir / "voc" / f"{m}_classes.csv"
        if not f.is_file():
            raise InputError(f"{f}: missing (run `dvc repro voc`)")
        tables[m] = pd.read_csv(f)
    classes = next((list(t["class"]) for t in tables.values() if len(t)), [])  # a skipped method's table is empty

    def cell(v: Any) -> str:
        return "–" if v != v else f"{v:.1f}"  # NaN: no non-difficult object of the class

    out = ["# VOC detection transfer", "", "Per-class AP50 (VOC2007 11-point metric), test split:", "",
           "| method | " + " | ".join(classes) + " | mAP |", "|---|" + "---|" * (len(classes) + 1)]
    for m, t in tables.items():
        ap = dict(zip(t["class"], t["ap50"]))
        summ = read_json(metrics_dir / "voc" / f"{m}.json")
        out.append(f"| {m} | " + " | ".join(cell(ap.get(c, math.nan)) for c in classes)
                   + f" | {cell(summ.get('map50', math.nan))} |")
    keys = [("map50", "AP50 (11-point)"), ("map50_area", "AP50 (area)"), ("ap", "AP (0.5:0.95)"), ("ap75", "AP75")]
    out += ["", "| method | " + " | ".join(k[1] for k in keys) + " | steps | seconds |", "|---|" + "---|" * (len(keys) + 2)]
    for m in methods:
        summ = read_json(metrics_dir / "voc" / f"{m}.json")
        out.append(f"| {m} | " + " | ".join(cell(summ.get(k, math.nan)) for k, _ in keys)
                   + f" | {summ.get('steps', 0)} | {summ.get('seconds', math.nan):.1f} |")
    return "\n".join([*out, "", *[f"- {n}" for n in notes], ""])


# --------------------------------------------------------------------------- paper numbers
PAPER_RESULTS = Path(__file__).resolve().parent / "paper_results.yaml"
# which of our columns meets a published number of each protocol / metric
OURS_FOR = {("knn", "top1"): "knn_paper_top1", ("linear", "top1"): "linear_top1",
            ("linear_svm", "top1"): "svm_top1", ("linear_per_layer", "top1"): "linear_top1",
            # RotNet's CIFAR-10 non-linear classifier per block: our probes with probe.classifier mlp
            ("nonlinear_per_block", "top1"): "linear_top1",
            ("finetune", "top1"): "finetune_top1", ("detection", "ap50"): "voc_ap50",
            ("detection", "ap"): "voc_ap", ("detection", "ap75"): "voc_ap75"}
PER_LAYER = ("linear_per_layer", "nonlinear_per_block")  # met by our probe of the same layer


def load_paper_results(path: str | Path = PAPER_RESULTS) -> dict[str, dict[str, Any]]:
    """id -> row of the sourced table of published numbers (each with its source and whether the
    number was checked against a text)."""
    import yaml

    rows = yaml.safe_load(Path(path).read_text()) or []
    out = {r["id"]: r for r in rows}
    if len(out) != len(rows):
        raise InputError(f"{path}: duplicate ids")
    return out


def paper_columns(table: pd.DataFrame, paper: dict[str, str], note: str,
                  results: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """``table`` + paper, ours (the column of the same protocol), diff (ours - paper), and what the
    paper's number is (protocol, source, checked), for each method with an id in ``paper``
    (``report.paper``); the others get ``note`` (why there is no paper number)."""
    t = table.copy()
    cols: dict[str, list[Any]] = {k: [] for k in ("paper", "ours", "diff", "paper_protocol", "paper_source")}
    for m in t.index:
        pid = paper.get(m)
        if pid is None:
            for k, v in (("paper", math.nan), ("ours", math.nan), ("diff", math.nan), ("paper_protocol", note),
                         ("paper_source", "")):
                cols[k].append(v)
            continue
        if pid not in results:
            raise InputError(f"report.paper.{m}: {pid!r} is not an id of {PAPER_RESULTS.name}")
        r = results[pid]
        key = (r["protocol"], r["metric"])
        if key not in OURS_FOR:
            raise InputError(f"report.paper.{m}: no column of ours for protocol {key} of {pid}")
        col = OURS_FOR[key]
        if r["protocol"] in PER_LAYER and f"probe_{r['layer']}_top1" in t.columns:
            col = f"probe_{r['layer']}_top1"  # our probe of the same layer (probe.layers)
        ours = float(t.at[m, col])
        if key == ("knn", "top1") and math.isnan(ours):
            ours = float(t.at[m, next(c for c in t.columns if c.startswith("knn") and c.endswith("_top1"))])
        value = math.nan if r["value"] is None else float(r["value"])
        ours_pct = ours  # percent, as the papers
        layer = f" {r['layer']}" if r.get("layer") else ""
        cols["paper"].append(value)
        cols["ours"].append(ours_pct)
        cols["diff"].append(ours_pct - value)
        cols["paper_protocol"].append(f"{r['protocol']}{layer} {r['metric']}, {r['backbone']}, {r['setting']}"
                                      + ("" if r.get("checked") else " (UNVERIFIED)"))
        cols["paper_source"].append(r["source"])
    for k, v in cols.items():
        t[k] = v
    return t


def probes_table(all_metrics: dict[str, dict[str, dict[str, Any]]], paper: dict[str, str],
                 results: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Per-layer probe top-1 (rows: methods that ran probes, and "<m> (paper)" under each method whose
    ``report.paper`` id is a per-layer row: its sibling layers from the sourced table); columns: layers
    in network order. Empty when no method ran probes."""
    rows: dict[str, dict[str, float]] = {}
    for m, st in all_metrics.items():
        pr = st.get("linear", {}).get("probes")
        if not pr:
            continue
        rows[m] = {name: r.get("top1", math.nan) for name, r in pr["layers"].items()}
        pid = paper.get(m)
        if pid in results and results[pid]["protocol"] in PER_LAYER:
            stem = pid.rsplit("/", 1)[0]
            pub = {r["layer"]: (math.nan if r["value"] is None else float(r["value"])) for i, r in results.items()
                   if i.rsplit("/", 1)[0] == stem and r["protocol"] in PER_LAYER}
            rows[f"{m} (paper)"] = pub
    t = pd.DataFrame.from_dict(rows, orient="index")
    t.index.name = "method"
    return t


# --------------------------------------------------------------------------- InstDisc Table 1
# Wu et al. 2018, Table 1 (CIFAR-10, ResNet-18): (softmax, m) -> ids of its linear SVM and kNN
# top-1 in paper_results.yaml (the numbers, their source and whether they were checked live there)
TABLE1_IDS = {
    ("parametric", 0): "parametric", ("nonparametric", 0): "nonparametric", ("nonparametric", 1): "nce1",
    ("nonparametric", 10): "nce10", ("nonparametric", 512): "nce512", ("nonparametric", 4096): "nce4096",
}


def table1_paper(softmax: str, m: int, results: dict[str, dict[str, Any]] | None = None) -> tuple[float, float]:
    """(linear SVM, kNN) top-1 of InstDisc's Table 1 row, NaN where the paper has no such row."""
    row = TABLE1_IDS.get((softmax, m))
    if row is None:
        return math.nan, math.nan
    results = results if results is not None else load_paper_results()
    get = [results[f"instdisc/cifar10/resnet18/{row}/{p}"]["value"] for p in ("linear_svm", "knn")]
    return tuple(math.nan if v is None else float(v) for v in get)  # type: ignore[return-value]


def row_label(softmax: str, m: int) -> str:
    if softmax == "parametric":
        return "parametric softmax"
    return "non-parametric softmax" if m == 0 else f"NCE m = {m}"


def table1(results: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per Table 1 setting: ours beside the paper's CIFAR-10 figures."""
    rows = []
    published = load_paper_results()
    for name, r in results.items():
        paper = table1_paper(r["softmax"], r["nce_m"], published)
        m = r["nce_m"]
        label = row_label(r["softmax"], m)
        if r["nce_m_used"] != m:
            label += f" (m used: {r['nce_m_used']})"
        rows.append({"row": name, "setting": label, "svm_top1": r.get("svm_top1", math.nan),
                     "paper_linear_svm_top1": paper[0], "knn_top1": r["knn_top1"], "paper_knn_top1": paper[1],
                     "linear_top1": r["linear_top1"],
                     "final_loss": r["final_loss"], "epochs": r["epochs"],
                     "pretrain_seconds": r["pretrain_seconds"]})
    return pd.DataFrame(rows).set_index("row")


def table1_markdown(table: pd.DataFrame, notes: list[str]) -> str:
    return markdown_table(table, "InstDisc Table 1 (Wu et al. 2018)", notes, "row",
                          {"epochs": "{:.0f}", "final_loss": "{:.3f}"})


def table1_files(cfg: Any, results: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``reports/instdisc_table1.{md,csv}`` from the rows' metrics (``selfsup.eval.instdisc_table1.run_rows``), beside
    the paper's figures; with no rows (the sweep off, or ``instdisc_table1.rows`` empty) a page that
    says why."""
    t1 = cfg.instdisc_table1
    if not results:
        why = "instdisc_table1.rows is empty"
        if t1.rows:  # rows, but the sweep is off
            why = f"instdisc_table1.run is {t1.run}" + (" and instdisc is not among methods" if t1.run == "auto" else "")
        return {"instdisc_table1.md": f"# InstDisc Table 1 (Wu et al. 2018)\n\nNot run: {why} in params.yaml.\n",
                "instdisc_table1.csv": "row\n"}
    table = table1(results)
    notes = [
        f"Ours: dataset {cfg.dataset.name}, backbone {cfg.model.backbone}, the `instdisc` params block with each "
        f"row's softmax / nce_m, {table['epochs'].max()} epochs; test-split top-1.",
        f"knn_top1: weighted kNN, k = {t1.knn_k} (capped at the training-set size), votes exp(sim / T) with T the "
        "row's training temperature, on the normalised 128-d embedding re-extracted with the test transform "
        "(the paper's protocol, lemniscate's test.py; it reads the memory bank where we re-extract).",
        f"svm_top1: linear SVM (C = {cfg.svm.c}) on the L2-normalised backbone features, as the paper's linear "
        f"column; linear_top1: the linear probe of the main table ({cfg.linear.epochs} epochs).",
        "Paper numbers: selfsup/report/paper_results.yaml (source and whether each was checked against the paper's text).",
        "paper_*: Wu et al. 2018, Table 1: CIFAR-10, ResNet-18, 128-d embedding, 200 epochs.",
    ]
    if any(r["nce_m_used"] != r["nce_m"] for r in results.values()):
        notes.append("nce_m is capped below the training-set size (uniform noise over N images; the method refuses "
                     "m >= N): rows whose m was capped say so.")
    return {"instdisc_table1.md": table1_markdown(table, notes),
            "instdisc_table1.csv": table.to_csv(float_format="%.4f")}

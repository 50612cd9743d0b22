"""table1@<row>: one row of InstDisc's Table 1 (pretrain + extract + kNN + linear in one process)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfsup.data import load_prepared  # noqa: E402
from selfsup.io import write_json  # noqa: E402
from selfsup.launch import distributed  # noqa: E402
from selfsup.stage import Paths, setup  # noqa: E402
from selfsup.table1 import run_row  # noqa: E402

name = sys.argv[1]
cfg = setup()
distributed(cfg)
P = Paths()
if name not in cfg.instdisc_table1.rows:
    raise SystemExit(f"instdisc_table1.rows: no row {name!r}")
data = load_prepared(P.dataset)
out = run_row(cfg, name, data, P.root / "data" / "table1" / name / "ckpt.pt")
if out is not None:  # rank 0
    write_json(P.metrics("table1", name), out)

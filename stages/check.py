"""check: params.yaml, whole, through the typed config (every section and every method block: unknown
keys with the closest known one, bad types and values) and against this machine (the dataset path, the
device), before any other stage runs (``selfsup.data.preflight``). DVC removes a stage's outputs before it
runs it; every stage depends on this one, so a bad key fails here and costs nothing.

Its output's content never changes, so re-running it (any edit of params.yaml) re-runs nothing
downstream."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfsup.core.io import atomic_path  # noqa: E402
from selfsup.data.preflight import preflight  # noqa: E402
from selfsup.core.stage import CHECKED, setup  # noqa: E402

cfg = setup(parse_methods=True)
preflight(cfg)
with atomic_path(Path(CHECKED)) as tmp:
    tmp.write_text("params.yaml passed stages/check.py\n")
print(f"check: params.yaml ok ({len(cfg.methods)} methods: {', '.join(cfg.methods)})")

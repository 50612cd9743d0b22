"""download: fetch / read the configured dataset into data/dataset (uniform format)."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfsup.data.sources import prepare  # noqa: E402
from selfsup.core.io import write_json  # noqa: E402
from selfsup.core.stage import Paths, setup  # noqa: E402

cfg = setup()
t0 = time.perf_counter()
meta = prepare(cfg.dataset, cfg.seed, Paths().dataset)
write_json(Paths().metrics("download"), {"n_train": meta["n_train"], "n_test": meta["n_test"],
                                         "classes": len(meta["classes"]), "seconds": time.perf_counter() - t0})
print(f"download: {meta['name']} {meta['n_train']} train / {meta['n_test']} test, {meta['image_size'] or 'variable-size'} px")

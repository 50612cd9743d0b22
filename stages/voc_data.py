"""voc_data: the VOC detection data (embedded digits set, torchvision's VOC downloads, or a local
VOCdevkit) -> data/voc/manifest.json (+ the embedded set's devkit folders).

A stage of its own so that only the ``voc.enabled / dataset / root / path / download / embedded`` keys
(and the digits split it draws from: seed, dataset.test_fraction) re-run it.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfsup.core.io import write_json  # noqa: E402
from selfsup.core.stage import Paths, setup  # noqa: E402
from selfsup.detection.voc_data import prepare_voc  # noqa: E402

cfg = setup(parse_methods=False)
t0 = time.perf_counter()
man = prepare_voc(cfg.voc, cfg.seed, cfg.dataset.test_fraction, Paths().voc)
write_json(Paths().metrics("voc_data"), {
    **{k: v for k, v in man.items() if k.startswith(("n_", "objects_", "difficult_", "truncated_"))},
    "classes": len(man["classes"]), "seconds": time.perf_counter() - t0})
print(f"voc_data: {man['source']}: {man['n_trainval']} trainval / {man['n_test']} test images, "
      f"{len(man['classes'])} classes")

"""knn@<method>: weighted kNN (cosine, exp(sim/T) votes) for each configured k, and the method's paper protocol
(knn.paper.<method>: on the backbone or its eval head's features, at a set or its training temperature)."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfsup.evaluate import knn_protocols, paper_protocol  # noqa: E402
from selfsup.io import read_features, read_json, write_json  # noqa: E402
from selfsup.stage import Paths, setup  # noqa: E402

name = sys.argv[1]
cfg = setup(parse_methods=False)
P = Paths()
meta = read_json(P.dataset / "meta.json")
tr, ytr = read_features(P.features(name, "train"))
te, yte = read_features(P.features(name, "test"))
t0 = time.perf_counter()
paper = cfg.knn.paper.get(name)
spec = None
if paper is not None:  # the method's own protocol: on its eval head's features, at its training temperature
    spec = paper_protocol(f"knn.paper.{name}", paper.k, paper.temperature, paper.features,
                          read_json(P.features(name, "train").parent / "protocol.json"), paper.pca_dim)
    if paper.features == "head":
        spec["features"] = (*read_features(P.features(name, "head_train")), *read_features(P.features(name, "head_test")))
out = knn_protocols(tr, ytr, te, yte, ks=cfg.knn.k, temperature=cfg.knn.temperature,
                    num_classes=len(meta["classes"]), paper=spec)
write_json(P.metrics("knn", name), {**out, "seconds": time.perf_counter() - t0})

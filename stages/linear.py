"""linear@<method>: linear probe on frozen features (fixed schedule, test top-1 at the end), the linear SVM, and
the per-layer probes when probe.layers asks for them."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfsup.data import load_prepared  # noqa: E402
from selfsup.evaluate import linear_eval, svm_eval  # noqa: E402
from selfsup.io import derive_seed, read_features, read_json, resolve_device, write_json  # noqa: E402
from selfsup.models import load_backbone  # noqa: E402
from selfsup.stage import Paths, setup  # noqa: E402

name = sys.argv[1]
cfg = setup(parse_methods=False)
P = Paths()
meta = read_json(P.dataset / "meta.json")
tr, ytr = read_features(P.features(name, "train"))
te, yte = read_features(P.features(name, "test"))
t0 = time.perf_counter()
c = cfg.linear
device = resolve_device(cfg.device)
if c.protocol == "augmented" or cfg.probe.layers:  # these read the encoder again, on the dataset
    net, data = load_backbone(P.model(name), device), load_prepared(P.dataset)
if c.protocol == "frozen":
    out = linear_eval(tr, ytr, te, yte, num_classes=len(meta["classes"]), epochs=c.epochs, batch_size=c.batch_size,
                      lr=c.lr, weight_decay=c.weight_decay, seed=derive_seed(cfg.seed, "linear", name), device=device)
else:  # MoCo's protocol: augmented views through the frozen encoder every epoch
    from selfsup.lincls import augmented_linear_probe

    out = augmented_linear_probe(net, data, cfg, te, yte, device, derive_seed(cfg.seed, "linear", name))
if cfg.svm.enabled:
    out.update(svm_eval(tr, ytr, te, yte, cfg.svm.c, derive_seed(cfg.seed, "svm", name)))
if cfg.probe.layers:  # per-layer probes
    from selfsup.probes import probe_all

    out["probes"] = probe_all(net, data, device, cfg.probe, derive_seed(cfg.seed, "probe", name), workers=cfg.workers,
                              resize=cfg.dataset.resize_size, crop=cfg.dataset.crop_size,
                              batch_size=cfg.extract.batch_size)
write_json(P.metrics("linear", name), {**out, "seconds": time.perf_counter() - t0})

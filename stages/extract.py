"""extract@<method>: final features of the train and test splits (eval mode, eval transform), and the
features of the method's paper protocol (its saved eval head: head_<split>.parquet, protocol.json); with
several processes each extracts its share of the rows and rank 0 writes them."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfsup.data import load_prepared  # noqa: E402
from selfsup.dist import is_main  # noqa: E402
from selfsup.features import apply_head, extract_sharded  # noqa: E402
from selfsup.io import resolve_device, write_features, write_json  # noqa: E402
from selfsup.launch import distributed  # noqa: E402
from selfsup.stage import Paths, setup  # noqa: E402
from selfsup.models import load_backbone, load_eval_head  # noqa: E402

name = sys.argv[1]
cfg = setup(parse_methods=False)
distributed(cfg)
P = Paths()
data = load_prepared(P.dataset)
device = resolve_device(cfg.device)
net = load_backbone(P.model(name), device)
head, temperature = load_eval_head(P.model(name), device)
t0 = time.perf_counter()
n = 0
for split in ("train", "test"):
    s = getattr(data, split)
    feats = extract_sharded(net, s, data.meta, device, cfg.extract.batch_size, desc=f"extract {name} {split}",
                            workers=cfg.workers, resize=cfg.dataset.resize_size, crop=cfg.dataset.crop_size)
    if is_main():
        write_features(P.features(name, split), feats, s.y)
        if head is not None:
            write_features(P.features(name, f"head_{split}"), apply_head(head, feats, device), s.y)
    n += len(feats)
if not is_main():
    sys.exit(0)
dt = time.perf_counter() - t0
write_json(P.features(name, "train").parent / "protocol.json",
           {"head": None if head is None else head.spec, "temperature": temperature})
write_json(P.metrics("extract", name), {"seconds": dt, "images_per_s": n / dt, "dim": int(feats.shape[1])})

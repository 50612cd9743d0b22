"""tokenizer: BEiT's visual tokeniser (params.yaml ``tokenizer:``) -> data/tokenizer/tokenizer.pt +
metrics/tokenizer.json.

kind vq: a VQ-VAE trained on the prepared training split; kind dalle: the user's DALL-E encoder weights
(``tokenizer.path``) wrapped with this dataset's normalisation. BEiT reads the file as its upstream
(``methods.beit: data/tokenizer/tokenizer.pt``).
"""
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from selfsup.core.config import ConfigError, load_config, load_yaml  # noqa: E402
from selfsup.data.prepared import load_prepared  # noqa: E402
from selfsup.core.io import resolve_device, write_json  # noqa: E402
from selfsup.core.stage import Paths  # noqa: E402
from selfsup.models.tokenizer import check_patch_against, make_tokenizer, save_tokenizer  # noqa: E402

OUT = Path("data") / "tokenizer" / "tokenizer.pt"


def main(root: Path = Path("."), params: str = "params.yaml") -> dict:
    logging.basicConfig(level=os.environ.get("SELFSUP_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    if "SELFSUP_THREADS" in os.environ:
        import torch

        torch.set_num_threads(int(os.environ["SELFSUP_THREADS"]))
    raw = load_yaml((root / params).read_text()) or {}
    cfg = load_config(root / params, parse_methods=False)  # unknown keys / bad values named, tokenizer.* too
    tok_cfg = cfg.tokenizer
    check_patch_against(tok_cfg, raw)
    P = Paths(root)
    data = load_prepared(P.dataset)
    t0 = time.perf_counter()
    tok, metrics = make_tokenizer(data, tok_cfg, resolve_device(cfg.device), run=cfg)
    history = metrics.pop("history", [])
    metrics["seconds"] = time.perf_counter() - t0
    save_tokenizer(root / OUT, tok, metrics)
    write_json(P.metrics("tokenizer"), {**metrics, "history": history})
    print(f"tokenizer: {tok_cfg.kind}, {tok.vocab_size} tokens of {tok.patch} px -> {root / OUT}"
          + (f"; reconstruction MSE {metrics['first_mse']:.4f} -> {metrics['final_mse']:.4f}, "
             f"{metrics['final_used_codes']} codes used" if tok_cfg.kind == "vq" else ""))
    return metrics


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"params: {e}")

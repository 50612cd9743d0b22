"""Peak GPU memory per process of the ImageNet ViT-B/16 fine-tuning recipe (selfsup/eval/finetune.py: AdamW,
drop path 0.1, a 1000-class head), fp32 against bf16 / fp16 autocast, at the batch sizes per process asked.

    python benchmarks/finetune_memory.py [--batch 32 64 128 256] [--backbone vit_base] [--size 224]
                                         [--classes 1000] [--measure]

Without a GPU (the default) it is an estimate, and says so:

- the model state, counted: fp32 weights, fp32 gradients and AdamW's two fp32 moments, 16 bytes per
  trained parameter;
- the activations autograd keeps for the backward pass, measured on the CPU: every tensor the training
  forward saves (``torch.autograd.graph.saved_tensors_hooks``), each storage counted once, at batch 1
  and batch 2; the difference is the per-image cost, the rest a constant (under autocast: the low
  precision copies of the weights autocast caches for the forward). fp16 saves what bf16 saves (two
  bytes an element): measured once under bf16 autocast, reported for both;
- saved attention matrices (B, heads, N, N) are listed apart: the CPU kernel may keep them, a GPU's
  flash / memory-efficient attention (PyTorch's scaled_dot_product_attention) keeps none, so the
  estimate leaves them out.

Not counted: the CUDA context, cuBLAS / cuDNN workspaces, the allocator's caching and fragmentation,
the gradients in flight during the backward pass (about one block's activations at a time), the data
loader's pinned batches. Read the estimate as a lower bound of ``torch.cuda.max_memory_allocated``.

``--measure`` on a CUDA machine runs one real training step per setting and prints
``torch.cuda.max_memory_allocated`` beside the estimate.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1024 ** 3


def build(backbone: str, size: int, classes: int, device: torch.device) -> nn.Module:
    """The fine-tuned network of selfsup.eval.finetune: backbone + Linear(D, classes), drop path 0.1."""
    from selfsup.models.backbones import build_backbone, vit_trunk

    net = build_backbone(backbone, 3, image_size=size)
    if vit_trunk(net) is not None:
        vit_trunk(net).set_drop_path(0.1)
    return nn.Sequential(net, nn.Linear(net.out_dim, classes)).to(device).train()


def saved_bytes(model: nn.Module, batch: int, size: int, precision: str) -> tuple[int, int]:
    """(bytes of the tensors the forward saves for backward, those of them shaped like an attention
    matrix (..., N, N), N the tokens), each storage once, the parameters themselves left out (the model
    state counts them), one training forward at ``batch`` on the CPU."""
    from selfsup.eval.finetune import autocast
    from selfsup.models.backbones import vit_trunk

    vit = vit_trunk(model[0])
    tokens = (size // vit.patch) ** 2 + 1 if vit is not None else -1
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st._cdata not in params:
            seen[st._cdata] = (st.nbytes(), t.ndim >= 3 and t.shape[-1] == t.shape[-2] == tokens)
        return t

    x = torch.randn(batch, 3, size, size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(torch.device("cpu"), precision):
        model(x).float().sum()
    total = sum(b for b, _ in seen.values())
    return total, sum(b for b, sq in seen.values() if sq)


def estimate(model: nn.Module, size: int, precision: str) -> dict[str, float]:
    """Per-image and constant saved bytes (attention matrices apart) from batches 1 and 2."""
    (a1, s1), (a2, s2) = saved_bytes(model, 1, size, precision), saved_bytes(model, 2, size, precision)
    return {"per_image": (a2 - s2) - (a1 - s1), "constant": (a1 - s1) - ((a2 - s2) - (a1 - s1)),
            "attention_per_image": s2 - s1}


def measure(backbone: str, size: int, classes: int, batch: int, precision: str) -> float:
    """GiB: torch.cuda.max_memory_allocated over one AdamW training step (CUDA only)."""
    from selfsup.eval.finetune import accumulated_step

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build(backbone, size, classes, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    x = torch.randn(batch, 3, size, size, device=device)
    t = nn.functional.one_hot(torch.randint(0, classes, (batch,), device=device), classes).float()
    accumulated_step(model, opt, [(x, t)], device, precision, scaler)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / GIB
    del model, opt, x, t
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 64, 128, 256], help="images per process")
    ap.add_argument("--backbone", default="vit_base")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--measure", action="store_true", help="also run one real step per setting on CUDA")
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build(args.backbone, args.size, args.classes, torch.device("cpu"))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = 16 * n  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
    est = {p: estimate(model, args.size, p) for p in ("fp32", "bf16")}
    est["fp16"] = est["bf16"]  # the same element size; not run under fp16 on the CPU
    print(f"{args.backbone} at {args.size} px, {args.classes} classes: {n / 1e6:.1f}M trained parameters; "
          f"AdamW state (fp32 weights, gradients, 2 moments): {state / GIB:.2f} GiB")
    print("activations saved for backward, measured on the CPU at batch 1 and 2 (per image + constant): "
          + "; ".join(f"{p} {e['per_image'] / 2**20:.1f} MiB/image + {e['constant'] / 2**20:.1f} MiB"
                      for p, e in est.items() if p != "fp16"))
    att = est["fp32"]["attention_per_image"]
    print(f"attention matrices among them: {att / 2**20:.1f} MiB/image (fp32), left out: a GPU's fused "
          "attention keeps none" if att else "attention matrices among them: none (the CPU ran a fused kernel)")
    head = f"{'batch':>6} {'precision':>9} {'estimate GiB':>13}" + (f" {'measured GiB':>13}" if args.measure else "")
    print("\nestimated peak per process (a lower bound: no CUDA context, workspaces, allocator caching, backward "
          "transients)")
    print(head)
    for b in args.batch:
        for p in ("fp32", "bf16", "fp16"):
            e = est[p]
            gib = (state + e["constant"] + b * e["per_image"]) / GIB
            row = f"{b:>6} {p:>9} {gib:>13.2f}"
            if args.measure:
                row += f" {measure(args.backbone, args.size, args.classes, b, p):>13.2f}"
            print(row)
    print(f"\n({time.perf_counter() - t0:.0f} s; estimated on the CPU{', measured on CUDA' if args.measure else ''})")


if __name__ == "__main__":
    main()

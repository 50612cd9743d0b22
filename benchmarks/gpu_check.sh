#!/usr/bin/env bash
# The GPU check: the throughput benchmark (benchmarks/throughput.py) for resnet18_cifar at 32 px and
# resnet50 at 224 px, bf16 with channels_last, on whatever GPU is present; in one go, at most 8 minutes.
#   bash benchmarks/gpu_check.sh            (needs torch, torchvision, numpy, pyyaml, faiss for the
#                                            clustering methods; run from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU: this check is for a GPU machine'; print(torch.cuda.get_device_name(0), torch.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# 32 px: every method; 224 px: ResNet-50, the methods without whole-dataset clustering at epoch starts
timeout 240 "$PY" benchmarks/throughput.py --backbone resnet18_cifar --size 32 --batch 512 --steps 20 \
    --precision bf16 --channels-last --device cuda
timeout 200 "$PY" benchmarks/throughput.py --backbone resnet50 --size 224 --batch 128 --steps 10 \
    --precision bf16 --channels-last --device cuda --methods supervised,instdisc,invaspread,moco,simclr

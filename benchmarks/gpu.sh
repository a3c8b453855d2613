#!/usr/bin/env bash
# Both benchmarks on one CUDA GPU in a few minutes (each configuration is a fresh process: ~13 processes in all).
# Figures and printed output go to the folder given as $1 (default benchmarks/results/gpu).
#   bash benchmarks/gpu.sh [RESULTS_DIR]
# Inference: fp32 (the equality check needs it), ViT-S/B at 224 px (batch 64) and 896 px (batch 8).
# Train step: bf16 autocast as the engine's default on GPU, batch 64 per GPU (DINO's per-GPU batch), 2 global views.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt" || true

python benchmarks/bench_inference.py --device cuda --batch 64 8 --warmup 3 --repeats 10 \
    --json "$OUT/inference.json" 2>&1 | tee "$OUT/inference.txt"

python benchmarks/bench_train_step.py --device cuda --precision bf16 --batch 64 --warmup 3 --repeats 10 \
    --json "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.txt"

echo "results in $OUT"

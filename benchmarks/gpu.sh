#!/usr/bin/env bash
# One prepared GPU run, under 8 minutes on one CUDA GPU (each step has a time limit; about 7 minutes expected):
#   inference   ViT-S/B at 224 px (batch 64) and 896 px (batch 8), timm in fp32 and in bf16 (autocast), each against
#               the fp32 DINO-style reference              -> inference_fp32.{json,txt}, inference_bf16.{json,txt}
#   train step  ADCLR vs DINO, bf16 autocast (the engine's default on GPU), batch 64 per GPU -> train_step.{json,txt}
#   data        the multi-crop pipeline's images/s per DataLoader worker process, on the host's CPU -> data.{json,txt}
#   study       the small-scale study's GPU variant: DINO and ADCLR pretrained at once (one process each, 7 data
#               workers each) for the whole epochs that fit in STUDY_MINUTES (default 2.5) of wall time, then scored
#               beside random init and the supervised anchors -> study/*.json, study.txt (STUDY_RUNS overrides the runs)
# plus the card (nvidia-smi.txt) and the versions (versions.txt: python, torch, CUDA, torchvision, timm). Each benchmark
# configuration runs in a fresh process. A step that fails or passes its limit is reported, the next one still runs,
# and the exit code is then 1.
#
#   bash benchmarks/gpu.sh [--quick] [RESULTS_DIR]     # RESULTS_DIR default: benchmarks/results/gpu
#   --quick: every step on the CPU in its smoke mode (a few minutes, no time limits; the train step in fp32, as the
#            CPU needs), to check this script on any machine.
#
# Setting up the GPU machine (no internet; python3 with torch + CUDA, huggingface_hub and safetensors installed):
#   pip install --no-deps --no-index timm-*.whl                 # the carried timm wheel (and any other missing
#                                                                 # dependency's: torchvision, einops, pillow, tqdm,
#                                                                 # scikit-image for the sample photos)
#   pip install --no-deps --no-build-isolation --no-index .     # this project, from the repository root
# The study recipe of the data step and the study step need the Fashion-MNIST idx .gz files: FASHION_MNIST=DIR
# (default /usr/share/datasets/fashion-mnist); without them only the data step's ImageNet recipe runs.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=()
DEVICE=(--device cuda)
TRAIN_PRECISION=bf16
LIMITS=1
if [[ "${1:-}" == "--quick" ]]; then
    QUICK=(--quick)
    DEVICE=(--device cpu)
    TRAIN_PRECISION=fp32
    LIMITS=0
    shift
fi
if [[ "${1:-}" == -* || $# -gt 1 ]]; then
    echo "usage: bash benchmarks/gpu.sh [--quick] [RESULTS_DIR]; got: $*" >&2
    exit 2
fi
OUT="${1:-benchmarks/results/gpu}"
FASHION_MNIST="${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
FAILED=()

step() {  # step NAME LIMIT_SECONDS COMMAND...: output to the screen and to $OUT/NAME.txt
    local name=$1 limit=$(( $2 * LIMITS ))  # timeout 0: no limit
    shift 2
    echo "== $name (limit ${limit}s): $*"
    if ! timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"; then
        FAILED+=("$name")
    fi
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv && nvidia-smi; } \
    > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available" >> "$OUT/nvidia-smi.txt"
python3 - > "$OUT/versions.txt" 2>&1 <<'PY'
import platform, timm, torch, torchvision
print(f"python {platform.python_version()}\ntorch {torch.__version__} (CUDA {torch.version.cuda})")
print(f"torchvision {torchvision.__version__}\ntimm {timm.__version__}")
print(f"gpu {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}")
PY
cat "$OUT/nvidia-smi.txt" "$OUT/versions.txt" | head -n 3

for dtype in fp32 bf16; do
    step "inference_$dtype" 80 python3 benchmarks/bench_inference.py "${DEVICE[@]}" --dtype "$dtype" --batch 64 8 \
        --warmup 2 --repeats 6 --json "$OUT/inference_$dtype.json" "${QUICK[@]}"
done
step train_step 120 python3 benchmarks/bench_train_step.py "${DEVICE[@]}" --precision "$TRAIN_PRECISION" --batch 64 \
    --json "$OUT/train_step.json" "${QUICK[@]}"
RECIPES=(imagenet)
if [[ -d "$FASHION_MNIST" ]]; then
    RECIPES+=(study)
else
    echo "no Fashion-MNIST under $FASHION_MNIST (set FASHION_MNIST=DIR): the data step runs the ImageNet recipe only"
fi
# bench_data writes data.txt itself; its own output is kept apart from the step log
step data_log 75 python3 benchmarks/bench_data.py --recipes "${RECIPES[@]}" --fashion-mnist "$FASHION_MNIST" \
    --out "$OUT" "${QUICK[@]}"

if [[ -d "$FASHION_MNIST" ]]; then
    STUDY_RUNS=(${STUDY_RUNS:-random_init supervised_s0 supervised_global_s0 dino_s0 adclr_s0})
    # scenes and checkpoints: not brought back, and new each time (a run left by an earlier call would be resumed)
    STUDY_TMP="$(mktemp -d "${TMPDIR:-/tmp}/adclr-gpu-study.XXXXXX")"
    if (( ${#QUICK[@]} )); then
        STUDY_ARGS=(--budget-minutes 0.2 --workers 1 --images 128 --quick)
    else
        STUDY_ARGS=(--budget-minutes "${STUDY_MINUTES:-2.5}" --workers 7)
    fi
    step study 270 python3 benchmarks/study.py --fashion-mnist "$FASHION_MNIST" --out "$OUT/study" \
        --data "$STUDY_TMP/data" --runs-dir "$STUDY_TMP/runs" "${STUDY_ARGS[@]}" --runs "${STUDY_RUNS[@]}"
    rm -rf "$STUDY_TMP"
fi

echo "results in $OUT"
if (( ${#FAILED[@]} )); then
    echo "FAILED steps: ${FAILED[*]}" >&2
    exit 1
fi

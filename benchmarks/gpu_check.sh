#!/usr/bin/env bash
# Issue 15's GPU figures in one command, about 7.5 minutes on one H100/H200 (each part has its own
# limit, 440 s together, so the whole fits one 10-minute device call with start-up to spare):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. tests    the GPU tests (pytest -m requires_gpu: bf16 fit, compile, device-resident data and its
#             exact resume, pinned bank batches, batch_size=auto);
# 2. train    a torch.profiler breakdown of a step, then training throughput of the GPU profile
#             (benchmarks/gpu_check.py; compile variants last);
# 3. table5   the Table V ratios: every training method against standard, every preprocessing defense
#             against the bare model (benchmarks/defense_cost.py, ResNet-18, Fashion-MNIST at 32x32);
# 4. attacks  attack throughput against the forward+backward limit, bf16 (benchmarks/attack_cost.py);
# 5. layout   a small paper-layout table on Fashion-MNIST, the 5 paper architectures as S and T
#             (experiment=gpu_fmnist_layout; 15 trainings, the part most likely to be cut short).
# OUT_DIR gets only summary.md (rebuilt after every part, so a cut-short run keeps what finished) and
# logs.tar.gz; runs, checkpoints and data go to a scratch folder in /tmp. Needs python3 with torch
# (CUDA) and requirements.txt's packages (the pure-Python ones a bare GPU image lacks come as wheels:
# benchmarks/gpu_wheels.sh), and Fashion-MNIST's IDX files in FMNIST_ROOT (default data/fashion-mnist,
# else Debian's /usr/share/datasets/fashion-mnist).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_check}}
SCRATCH=$(mktemp -d /tmp/gpu_check_scratch.XXXXXX)
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH="src:benchmarks:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 WANDB_MODE=offline
FMNIST_ROOT=${FMNIST_ROOT:-data/fashion-mnist}
[ -d "$FMNIST_ROOT" ] || FMNIST_ROOT=/usr/share/datasets/fashion-mnist
LOGS=$SCRATCH/logs
mkdir -p "$LOGS"
START=$(date +%s)
echo "| part | exit code (124: cut at its limit) | seconds |" > "$LOGS/parts.md"
echo "|---|---:|---:|" >> "$LOGS/parts.md"

summary() {
  {
    cat "$LOGS/device.txt"; echo; echo "Elapsed: $(( $(date +%s) - START )) s"; echo; cat "$LOGS/parts.md"
    [ -f "$SCRATCH/train/gpu_check.md" ] && { echo; cat "$SCRATCH/train/gpu_check.md"; }
    if [ -f "$LOGS/table5.log" ]; then
      echo; echo "## Table V ratios (defense_cost.py)"; grep -E '^\||^Training|^Test time|^model=' "$LOGS/table5.log"
    fi
    if [ -f "$LOGS/attacks.log" ]; then
      echo; echo "## Attack throughput, bf16 (attack_cost.py)"; grep -E '^\||^bare|^model=' "$LOGS/attacks.log"
    fi
    f=$(find "$SCRATCH/layout" -name table.md 2>/dev/null | head -1)
    if [ -n "$f" ]; then echo; echo "## Paper layout on Fashion-MNIST (gpu_fmnist_layout, 2 epochs)"; cat "$f"; fi
    [ -f "$LOGS/tests.log" ] && { echo; echo "## GPU tests"; tail -n 8 "$LOGS/tests.log"; }
  } > "$OUT/summary.md" 2>/dev/null
  tar -czf "$OUT/logs.tar.gz" -C "$SCRATCH" logs 2>/dev/null
}

part() {  # part <name> <seconds> <command...>: run with a limit, log it, note how it ended, re-summarise
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "| $name | $rc | $(( $(date +%s) - t0 )) |" >> "$LOGS/parts.md"
  tail -n 25 "$LOGS/$name.log"
  summary
}

"$PY" - > "$LOGS/device.txt" 2>&1 <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
PY
cat "$LOGS/device.txt"

part tests 120 "$PY" -m pytest -q -m requires_gpu -p no:cacheprovider tests/test_gpu.py tests/test_bank.py \
    tests/test_batching.py
part train 140 "$PY" benchmarks/gpu_check.py --out "$SCRATCH/train" --steps 60
part table5 50 "$PY" benchmarks/defense_cost.py --device cuda --precision bf16-mixed --model resnet18 \
    --data fashion_mnist --data-root "$FMNIST_ROOT" --image-size 32 --steps 20 --rounds 2 --threads 8 \
    --nrp-nb 23 --diffpure-steps 100 --unet-channels 64 128
part attacks 30 "$PY" benchmarks/attack_cost.py --device cuda --precision bf16 --model resnet18 --batch-size 512 \
    --steps 10 --rounds 2 --attacks pgd,ifgsm,mifgsm,difgsm,vmifgsm
part layout 100 "$PY" -m trigact.pipeline experiment=gpu_fmnist_layout "data.root=$FMNIST_ROOT" \
    "paths.root_dir=$SCRATCH/layout" pipeline.n_eval=500
cat "$OUT/summary.md"

#!/usr/bin/env bash
# The GPU check of the training loop against its own step, in one command (about 8 minutes on one H200):
#   bash launch/bench/gpu.sh [OUT_DIR]
# 1. the isolated step (MiT-b0, 512x512, bf16) at batch 8, 16, 32 and 64, eager, and compiled at batch 8 with
#    the default mode and with CUDA graphs (reduce-overhead);
# 2. the whole loop (segda bench loop: the real segda.train loop, shipped recipes, real shards and workers) for
#    pretrain, LoRA and self-training at 512x512 batch 8 with 8 loader workers, beside the loader alone and the
#    step alone, with the thread budget segda chooses, and once with the threads every library takes by itself
#    (what segda did before: OpenMP and OpenCV one thread per core in every process).
# Figures land in OUT_DIR (default bench-gpu/) as JSON files and log.txt.
set -euo pipefail
out=${1:-bench-gpu}
mkdir -p "$out"
export ACCELERATE_MIXED_PRECISION=bf16 PYTHONUNBUFFERED=1
log() { "$@" 2>&1 | tee -a "$out/log.txt"; }
data=${SEGDA_BENCH_DATA:-/tmp/segda-bench-loop}
for batch in 8 16 32 64; do
  log python -m segda bench train --crop 512 --batch "$batch" --steps 20 --repeats 3 --json "$out/step-b$batch.json"
done
log python -m segda bench train --crop 512 --batch 8 --steps 20 --repeats 3 --compile --json "$out/step-b8-compiled.json"
log python -m segda bench train --crop 512 --batch 8 --steps 20 --repeats 3 --compile --compile-mode reduce-overhead \
  --json "$out/step-b8-cudagraphs.json"
for stage in pretrain adapt selftrain; do
  log python -m segda bench loop --model b0 --stage "$stage" --crop 512 --batch 8 --workers 8 --steps 40 \
    --warmup 10 --frames 64 --size 1914x1052 --data-dir "$data" --json "$out/loop-$stage.json"
done
# the threads every library takes by itself, as segda did before data.threads
log python -m segda bench loop --model b0 --stage pretrain --crop 512 --batch 8 --workers 8 --threads library \
  --steps 40 --warmup 10 --frames 64 --size 1914x1052 --data-dir "$data" --json "$out/loop-pretrain-library.json"

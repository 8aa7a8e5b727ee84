#!/usr/bin/env bash
# The GPU check of the training loop against its own step, in one command (about 9 minutes on one H200):
#   bash launch/bench/gpu.sh [OUT_DIR]
# 1. the whole loop (`segda bench loop`: the real segda.train loop, shipped recipes, real shards and workers) for
#    pretrain, LoRA and self-training, MiT-b0, 512x512 crops, batch 8, 8 loader workers, beside the loader alone
#    and the step alone; and once with the threads each library takes by itself (data.threads=library: what
#    segda did before it shared the cores out);
# 2. the isolated step (`segda bench train`, bf16) at batch 8, 16, 32 and 64; then compiled at batch 8, with the
#    default mode and with CUDA graphs (reduce-overhead);
# 3. the fused decode head against transformers' own (`segda bench head`) at batch 8, bf16 autocast.
# Figures land in OUT_DIR (default bench-gpu/) as JSON files and log.txt. Sizes can be changed for a dry run on
# a CPU: CROP=64 BATCHES="2" WORKERS=1 FRAMES=8 SIZE=160x88 STEPS=3 WARMUP=2 MODEL=tiny bash launch/bench/gpu.sh
set -euo pipefail
out=${1:-bench-gpu}
mkdir -p "$out"
export ACCELERATE_MIXED_PRECISION=${ACCELERATE_MIXED_PRECISION:-bf16} PYTHONUNBUFFERED=1
CROP=${CROP:-512} BATCHES=${BATCHES:-"8 16 32 64"} WORKERS=${WORKERS:-8} FRAMES=${FRAMES:-32}
SIZE=${SIZE:-1914x1052} STEPS=${STEPS:-40} WARMUP=${WARMUP:-10} MODEL=${MODEL:-b0}
data=${SEGDA_BENCH_DATA:-/tmp/segda-bench-loop}
log() { "$@" 2>&1 | tee -a "$out/log.txt"; }
loop() {  # stage, threads
  log python -m segda bench loop --model "$MODEL" --stage "$1" --crop "$CROP" --batch 8 --workers "$WORKERS" \
    --steps "$STEPS" --warmup "$WARMUP" --frames "$FRAMES" --size "$SIZE" --data-dir "$data" --threads "$2" \
    --json "$out/loop-$1-$2.json"
}
for stage in pretrain adapt selftrain; do loop "$stage" auto; done
loop pretrain library
loop selftrain library
for batch in $BATCHES; do
  log python -m segda bench train --crop "$CROP" --batch "$batch" --steps 20 --repeats 3 --json "$out/step-b$batch.json"
done
log python -m segda bench train --crop "$CROP" --batch 8 --steps 20 --repeats 2 --compile --json "$out/step-b8-compiled.json"
log python -m segda bench train --crop "$CROP" --batch 8 --steps 20 --repeats 2 --compile --compile-mode reduce-overhead \
  --json "$out/step-b8-cudagraphs.json"
head_config=$([ "$MODEL" = b0 ] && echo b0 || echo demo)  # bench head knows MiT-b0 and the demo's half width
log python -m segda bench head --config "$head_config" --crop "$CROP" --batch 8 --steps 20 --repeats 3 --bf16 \
  --json "$out/head-b8.json"

#!/usr/bin/env bash
# The prepared GPU check (docs/bench.md "GPU check"), sized for <= 8 minutes on one GPU:
#   1. `attnfd bench-gpu`: R101 -> R18 at 513 px, batch 6, AMP, random weights, synthetic VOC-sized images:
#      cached vs online vs in-memory step time and peak GPU memory, cache build vs bare teacher, DataLoader
#      feed rate with 4 and 8 workers -> $OUT/gpu.{json,md}   (limit 330 s)
#   2. `attnfd bench-feed --device cuda`: the feed's per-sample host CPU with the device-side encode/decode on
#      the GPU -> $OUT/feed.{json,md}   (limit 150 s; skipped with FEED=0)
# Usage: scripts/gpu_check.sh [--quick]     (--quick: CPU, tiny sizes, seconds; what the test suite runs)
# Env: OUT (default bench), ATTNFD (default .venv/bin/attnfd, else attnfd on PATH), FEED (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench}
if [ -z "${ATTNFD:-}" ]; then
  if [ -x .venv/bin/attnfd ]; then ATTNFD=.venv/bin/attnfd; else ATTNFD=attnfd; fi
fi
QUICK=()
DEVICE=(--device cuda)
if [ "${1:-}" = "--quick" ]; then QUICK=(--quick); DEVICE=(--device cpu); fi
start=$(date +%s)
timeout 330 $ATTNFD bench-gpu --out "$OUT" "${QUICK[@]}"
wrote="$OUT/gpu.json"
if [ "${FEED:-1}" != "0" ]; then
  timeout 150 $ATTNFD bench-feed --out "$OUT" "${DEVICE[@]}" "${QUICK[@]}"
  wrote="$wrote and $OUT/feed.json"
fi
echo "gpu_check: done in $(( $(date +%s) - start )) s -> $wrote"

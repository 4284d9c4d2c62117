#!/usr/bin/env bash
# The demo student used end to end (docs/inference.md): evaluate → predict 5 val images → picture → export
# (TorchScript and ONNX) → evaluate each export. Extra arguments are passed to every command (e.g.
# --set runs_root=/elsewhere/runs --set data.root=/elsewhere/data/demo).
#   scripts/demo_inference.sh [--set key=value ...]
set -euo pipefail
PY=${PY:-.venv/bin/python}
CONFIG=${CONFIG:-configs/demo.toml}
RUN=${RUN:-runs/demo/student/deeplabv3plus_resnet18_attnfd_a30_batch_D_cached_K4_s0}
DATA=${DATA:-data/demo}
OUT=${OUT:-/tmp/attnfd-demo-inference}
PICTURE=${PICTURE:-docs/img/predict_demo.png}
attnfd() { "$PY" -m stages.cli "$@"; }
mkdir -p "$OUT"
attnfd evaluate --config "$CONFIG" "$@" --checkpoint "$RUN" --out "$OUT/eager.json"
attnfd predict --config "$CONFIG" "$@" --checkpoint "$RUN" --input "$DATA/JPEGImages/val_0000[0-4].jpg" \
    --out "$OUT/pred" --overlay --no-progress
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" "$PY" scripts/predict_picture.py --config "$CONFIG" "$@" --pred "$OUT/pred" --out "$PICTURE"
for fmt in torchscript onnx; do
    ext=$([ $fmt = onnx ] && echo onnx || echo pt)
    attnfd export --config "$CONFIG" "$@" --checkpoint "$RUN" --format $fmt --out "$OUT/student.$ext"
    attnfd evaluate --config "$CONFIG" "$@" --checkpoint "$OUT/student.$ext" --json --out "$OUT/$fmt.json" >/dev/null
done
"$PY" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
m = {k: json.load(open(f"{out}/{k}.json")) for k in ("eager", "torchscript", "onnx")}
for k, v in m.items():
    print(f"{k:12s} mIoU {v['miou'] * 100:.4f}  pixel acc {v['pixel_acc'] * 100:.4f}  ({v['protocol']['name']})")
PY

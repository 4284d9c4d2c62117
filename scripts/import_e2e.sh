#!/usr/bin/env bash
# Bring your own teacher and dataset, end to end (docs/teacher-import.md): a custom 11-class dataset declared
# in TOML → teacher (2 epochs: a plumbing check, not a good teacher) → its weights as a plain state dict →
# `attnfd teacher import` → cache → student; prints the original and the imported teacher's mIoU.
#   scripts/import_e2e.sh   (after `make data`; OUT=/tmp/attnfd-import-e2e by default)
set -euxo pipefail
cd "$(dirname "$0")/.."; OUT=${OUT:-/tmp/attnfd-import-e2e}; mkdir -p "$OUT"
A() { .venv/bin/attnfd "$@"; }
S=(--set "runs_root=\"$OUT/runs\"" --set "cache.root=\"$OUT/cache\"" --set teacher.train.epochs=2 --set teacher.train.eval_every=1 --set student.train.epochs=1)
A data check --config configs/custom_example.toml
A teacher --config configs/custom_example.toml "${S[@]}"
A evaluate --config configs/custom_example.toml "${S[@]}" --json --out "$OUT/original.json" > /dev/null
A teacher export "$OUT/teacher_state.pt" --config configs/custom_example.toml "${S[@]}"
I=("${S[@]}" --set 'name="custom_imported"')
A teacher import "$OUT/teacher_state.pt" --config configs/custom_example.toml "${I[@]}" --format state_dict
A evaluate --config configs/custom_example.toml "${I[@]}" --json --out "$OUT/imported.json" > /dev/null
A cache build --config configs/custom_example.toml "${I[@]}"
A student --config configs/custom_example.toml "${I[@]}"
python3 - "$OUT" <<'PY'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/{k}.json")) for k in ("original", "imported"))
print(f"original teacher mIoU {a['miou']*100:.4f}  imported {b['miou']*100:.4f}  classes {len(a.get('per_class_iou', []))}")
PY

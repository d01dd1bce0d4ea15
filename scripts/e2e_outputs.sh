#!/usr/bin/env bash
# The end-to-end commands whose outputs a refactor must not change, run against one
# code tree, each output in a file of OUT_DIR. Run it for two trees and diff the
# folders (timings and paths differ; everything else must not):
#
#   git worktree add /tmp/old <commit>
#   scripts/e2e_outputs.sh /tmp/old artifacts/e2e-old
#   scripts/e2e_outputs.sh .        artifacts/e2e-new
#   diff -r artifacts/e2e-old artifacts/e2e-new
#
# Needs artifacts/protocols (python scripts/make_protocols.py) and ../shared.
# About 15 minutes on 2 CPU cores (fine-tuning 2 epochs on 400 photos included).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
CODE=$(cd "$1" && pwd); OUT=$(mkdir -p "$2" && cd "$2" && pwd)
P=$HERE/artifacts/protocols/grocery
VAL=$(cd "$HERE/../shared/datasets/grocery-store/dataset/val" && pwd)
export PYTHONPATH=$CODE  # the tree under test, not the installed one
VS="$HERE/.venv/bin/python -m vsearch"
rm -rf "${OUT:?}"/*
head -601 "$P/center.csv" > "$OUT/center-600.csv"
head -401 "$P/train-pairs.csv" > "$OUT/pairs-400.csv"
cd "$CODE"
$VS eval --gallery "$P/gallery.csv" --queries "$P/queries-val.csv" --center-on "$OUT/center-600.csv" --json > "$OUT/eval-center600.json"
$VS ingest "$P/gallery.csv" --index "$OUT/idx" --center-on "$OUT/center-600.csv" --quiet > "$OUT/ingest.txt"
$VS info --index "$OUT/idx" --json | grep -v '"path"\|updated\|created\|format_version' > "$OUT/info.json" || true
$VS search "$VAL/Fruit/Apple/Pink-Lady/Pink-Lady_003.jpg" --index "$OUT/idx" --k 5 > "$OUT/search.txt"
$VS search "$VAL/Vegetables/Cucumber/Cucumber_002.jpg" --index "$OUT/idx" --k 2 --category coarse1 --category coarse12 > "$OUT/search-cat.txt"
$VS eval --index "$OUT/idx" --queries "$P/queries-val.csv" --json > "$OUT/eval-index.json"
$VS eval --index "$OUT/idx" --queries "$P/queries-val.csv" --regions --json > "$OUT/eval-regions.json"
$VS finetune --index "$OUT/idx" --pairs "$OUT/pairs-400.csv" --epochs 2 --name S --quiet --json > "$OUT/finetune.json"
$VS reindex --index "$OUT/idx" --model S --quiet > "$OUT/reindex.txt"
$VS eval --index "$OUT/idx" --queries "$P/queries-val.csv" --json > "$OUT/eval-S.json"
$VS model use base --index "$OUT/idx" --quiet > "$OUT/rollback.txt"
$VS eval --index "$OUT/idx" --queries "$P/queries-val.csv" --json > "$OUT/eval-rollback.json"
$VS model list --index "$OUT/idx" --json > "$OUT/models.json"
rm -rf "$OUT/idx"
echo "outputs in $OUT"

#!/usr/bin/env bash
# The adaptation table of README.md: protocols A (seen products), B (unseen
# products) and C (regions, zero-shot) on ../shared/datasets/grocery-store.
# Grocery takes ~45 minutes on a 2-core CPU (two fine-tuning runs and the reindexing
# of 2,640 photos as product images), clothing (class level) ~20 more.
# Writes under artifacts/adapt/.
#
#   scripts/bench_adapt.sh [DATASETS_DIR [PART]]   (default ../shared/datasets, all)
#   PART: grocery, clothing or all
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/datasets}
PART=${2:-all}
case "$PART" in grocery|clothing|all) ;; *) echo "PART must be grocery, clothing or all, not $PART" >&2; exit 2;; esac
OUT=artifacts/adapt
P=artifacts/protocols/grocery
VS=".venv/bin/vsearch"
mkdir -p "$OUT"
.venv/bin/python scripts/make_protocols.py --data "$DATA" --out artifacts/protocols

if [ "$PART" != clothing ]; then
  # the zero-shot index: 81 iconic images, centred on the (unlabelled) train photos
  if [ ! -f "$OUT/base/manifest.json" ]; then
    $VS ingest "$P/gallery.csv" --index "$OUT/base" --center-on "$P/center.csv" --quiet
  fi
  eval_to() { $VS eval --index "$1" --queries "$2" --json "${@:4}" > "$OUT/$3.json"; echo "$3: $(grep -E '"recall@(1|10)"' "$OUT/$3.json" | tr -d ' \n')"; }

  eval_to "$OUT/base" "$P/queries-val.csv" zero-shot
  eval_to "$OUT/base" "$P/queries-val.csv" zero-shot-regions --regions          # protocol C
  eval_to "$OUT/base" "$P/queries-val-B-seen.csv" zero-shot-B-seen
  eval_to "$OUT/base" "$P/queries-val-B-unseen.csv" zero-shot-B-unseen

  # photos as product images, no training
  rm -rf "$OUT/photos" && cp -r "$OUT/base" "$OUT/photos"
  $VS ingest "$P/train-pairs.csv" --index "$OUT/photos" --quiet
  eval_to "$OUT/photos" "$P/queries-val.csv" photos-as-images

  # protocol A: fine-tune on all train photos
  rm -rf "$OUT/A" && cp -r "$OUT/base" "$OUT/A"
  /usr/bin/time -f "finetune A: %e s" $VS finetune --index "$OUT/A" --pairs "$P/train-pairs.csv" --name A --quiet --json > "$OUT/finetune-A.json"
  $VS reindex --index "$OUT/A" --model A --quiet
  eval_to "$OUT/A" "$P/queries-val.csv" finetuned-A
  # both: fine-tuned model, train photos added as product images
  rm -rf "$OUT/A-photos" && cp -r "$OUT/A" "$OUT/A-photos"
  $VS ingest "$P/train-pairs.csv" --index "$OUT/A-photos" --quiet
  eval_to "$OUT/A-photos" "$P/queries-val.csv" finetuned-A-plus-photos

  # protocol B: fine-tune on products 0-40 only, evaluate both halves
  rm -rf "$OUT/B" && cp -r "$OUT/base" "$OUT/B"
  /usr/bin/time -f "finetune B: %e s" $VS finetune --index "$OUT/B" --pairs "$P/train-pairs-B.csv" --name B --quiet --json > "$OUT/finetune-B.json"
  $VS reindex --index "$OUT/B" --model B --quiet
  eval_to "$OUT/B" "$P/queries-val-B-seen.csv" finetuned-B-seen
  eval_to "$OUT/B" "$P/queries-val-B-unseen.csv" finetuned-B-unseen
fi

# class level (issue 11, part 3): clothing, train photos as the catalog, validation
# photos as queries scored by category precision@10; fine-tuned on image,category
# pairs of the train photos (no product ids)
C=artifacts/protocols/clothing
if [ "$PART" != grocery ] && [ -f "$C/gallery.csv" ]; then
  if [ ! -f "$OUT/clothing-base/manifest.json" ]; then
    $VS ingest "$C/gallery.csv" --index "$OUT/clothing-base" --quiet
  fi
  eval_cat() { $VS eval --index "$1" --queries "$C/queries.csv" --json > "$OUT/$2.json"; echo "$2: $(grep -E '"category_precision@10"' "$OUT/$2.json" | tr -d ' \n')"; }
  eval_cat "$OUT/clothing-base" clothing-zero-shot
  rm -rf "$OUT/clothing-C" && cp -r "$OUT/clothing-base" "$OUT/clothing-C"
  /usr/bin/time -f "finetune clothing: %e s" $VS finetune --index "$OUT/clothing-C" --pairs "$C/train-pairs.csv" --name C --quiet --json > "$OUT/finetune-clothing.json"
  $VS reindex --index "$OUT/clothing-C" --model C --quiet
  eval_cat "$OUT/clothing-C" clothing-finetuned-classes
fi

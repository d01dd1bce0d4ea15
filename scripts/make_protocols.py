#!/usr/bin/env python3
"""Write the evaluation CSVs for the two protocols of ../shared/datasets/README.md.

grocery:  gallery = the 81 iconic images, queries = the train + val in-store photos
          (expected_id = the photo's fine class); center.csv = the train photos, as
          unlabelled in-domain photos to centre on; queries-val.csv = the val photos
          only; train-pairs.csv = the train photos labelled with their product, to
          add as extra product images (`vsearch ingest train-pairs.csv`) or to
          fine-tune on (`vsearch finetune --pairs train-pairs.csv`): protocol A.
          Protocol B (unseen products) splits the 81 products by id: train-pairs-B.csv
          = train photos of products 0-40; queries-val-B-seen.csv / -unseen.csv = the
          val photos of products 0-40 / 41-80.
clothing: gallery = the train photos (one product each, category = class),
          queries = the validation photos, scored at class level; train-pairs.csv
          = the train photos labelled with their class only (image,category), for
          class-level fine-tuning (`vsearch finetune --pairs train-pairs.csv`).

    python scripts/make_protocols.py --data ../shared/datasets --out artifacts/protocols
    vsearch eval --gallery artifacts/protocols/grocery/gallery.csv \
                 --queries artifacts/protocols/grocery/queries.csv \
                 --center-on artifacts/protocols/grocery/center.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def grocery(root: Path, out: Path) -> None:
    dataset = root / "dataset"
    out.mkdir(parents=True, exist_ok=True)
    fine_to_category: dict[str, str] = {}
    with open(dataset / "classes.csv", newline="") as fh, open(out / "gallery.csv", "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["id", "image", "category"])
        for row in csv.reader(fh):
            if row[0].startswith("Class Name"):
                continue
            fine, coarse_id, iconic = row[1], row[3], row[4]
            fine_to_category[fine] = f"coarse{coarse_id}"
            writer.writerow([fine, str(dataset) + iconic, f"coarse{coarse_id}"])
    photos = {split: _grocery_split(dataset, split) for split in ("train", "val")}
    with open(out / "queries.csv", "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["image", "expected_id", "category"])
        for split in ("train", "val"):
            writer.writerows([path, fine, fine_to_category[fine]] for path, fine in photos[split])
    with open(out / "queries-val.csv", "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["image", "expected_id", "category"])
        writer.writerows([path, fine, fine_to_category[fine]] for path, fine in photos["val"])
    with open(out / "train-pairs.csv", "w", newline="") as dst:  # labelled photos: vsearch ingest adds them
        writer = csv.writer(dst)
        writer.writerow(["image", "product_id"])
        writer.writerows([path, fine] for path, fine in photos["train"])
    first_half = {str(n) for n in range(41)}
    _write(out / "train-pairs-B.csv", ["image", "product_id"], [[p, f] for p, f in photos["train"] if f in first_half])
    for name, keep in (("seen", True), ("unseen", False)):
        rows = [[p, f, fine_to_category[f]] for p, f in photos["val"] if (f in first_half) == keep]
        _write(out / f"queries-val-B-{name}.csv", ["image", "expected_id", "category"], rows)
    with open(out / "center.csv", "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["id", "image"])
        writer.writerows([f"photo{n}", path] for n, (path, _) in enumerate(photos["train"]))


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(header)
        writer.writerows(rows)


def _grocery_split(dataset: Path, split: str) -> list[tuple[str, str]]:
    rows = []
    for line in (dataset / f"{split}.txt").read_text().splitlines():
        if line.strip():
            path, fine, _ = (part.strip() for part in line.split(","))
            rows.append((str(dataset / path), fine))
    return rows


def clothing(root: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    train = sorted((root / "train").glob("*/*"))
    with open(out / "gallery.csv", "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["id", "image", "category"])
        for path in train:
            writer.writerow([f"{path.parent.name}/{path.stem}", str(path), path.parent.name])
    with open(out / "train-pairs.csv", "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["image", "category"])
        for path in train:
            writer.writerow([str(path), path.parent.name])
    with open(out / "queries.csv", "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["image", "category"])
        for path in sorted((root / "validation").glob("*/*")):
            writer.writerow([str(path), path.parent.name])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--out", type=Path, default=Path("artifacts/protocols"))
    args = parser.parse_args()
    if not (args.data / "grocery-store").is_dir():
        print(f"no data sets under {args.data}; pass --data", file=sys.stderr)
        return 1
    data = args.data.resolve()  # manifests hold absolute paths, so they work from any folder
    grocery(data / "grocery-store", args.out / "grocery")
    if (data / "clothing-small").is_dir():
        clothing(data / "clothing-small", args.out / "clothing")
    print(f"wrote {args.out}/grocery and {args.out}/clothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())

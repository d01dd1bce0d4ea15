"""Retrieval evaluation through exactly the production ingest and search code.

Gallery CSV: ``id,image[,category]``. Queries CSV: ``image[,expected_id][,category]``.
Recall@k counts a query whose ``expected_id`` is among the top-k products; mAP@10
treats ``expected_id`` as the one relevant product, or, for queries with only a
category, every gallery product of that category; category precision@10 is the
share of the top 10 products in the query's category.
"""

from __future__ import annotations

import csv
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .categories import matches_category
from .engine import Engine
from .errors import ImageError, ManifestError, VsearchError
from .query import Hit, SearchOptions
from .sources import read_manifest

__all__ = ["EvalError", "LabelledQuery", "QueryResult", "read_queries", "evaluate", "evaluate_index", "score"]


class EvalError(VsearchError):
    """The evaluation cannot produce meaningful numbers."""


@dataclass(frozen=True)
class LabelledQuery:
    image: str
    expected_id: str = ""
    category: str = ""


@dataclass(frozen=True)
class QueryResult:
    """One query and the products it retrieved, best first: what a report needs to
    show *why* a metric is low, which the averaged numbers cannot."""

    query: LabelledQuery
    hits: list[Hit]

    @property
    def rank(self) -> int | None:
        """The expected product's 1-based rank among the hits; None if it is absent
        or the query names no expected product."""
        ranked = [h.product_id for h in self.hits]
        if not self.query.expected_id or self.query.expected_id not in ranked:
            return None
        return ranked.index(self.query.expected_id) + 1


def read_queries(path: Path) -> list[LabelledQuery]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "image" not in reader.fieldnames:
            raise ManifestError(f"{path}:1: missing column image (found: {', '.join(reader.fieldnames or [])})")
        queries = []
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise ManifestError(f"{path}:{reader.line_num}: wrong number of fields")
            image = row["image"].strip()
            if not image:
                raise ManifestError(f"{path}:{reader.line_num}: empty image")
            if "://" not in image:
                image = str((path.parent / image).resolve())
            queries.append(LabelledQuery(image, (row.get("expected_id") or "").strip(), (row.get("category") or "").strip()))
    return queries


def score(
    queries: list[LabelledQuery], results: list[list[Hit]], gallery_per_category: dict[str, int], k: int = 10
) -> dict[str, Any]:
    """The metrics for ranked product lists, one list per query."""
    recall = {n: [] for n in (1, 5, 10)}  # type: dict[int, list[float]]
    ap, cat_precision = [], []
    for query, hits in zip(queries, results):
        ranked = [h.product_id for h in hits]
        if query.expected_id:
            for n in recall:
                recall[n].append(float(query.expected_id in ranked[:n]))
            relevant = [h.product_id == query.expected_id for h in hits[:10]]
            n_relevant = 1
        elif query.category:
            relevant = [matches_category(h.category, query.category) for h in hits[:10]]
            n_relevant = sum(n for c, n in gallery_per_category.items() if matches_category(c, query.category))
        else:
            continue
        ap.append(_average_precision(relevant, min(n_relevant, 10)))
        if query.category:
            top = hits[:10]
            cat_precision.append(sum(matches_category(h.category, query.category) for h in top) / 10)
    return {
        "recall@1": _mean(recall[1]),
        "recall@5": _mean(recall[5]),
        "recall@10": _mean(recall[10]),
        "map@10": _mean(ap),
        "category_precision@10": _mean(cat_precision),
        "n_queries": len(queries),
    }


def evaluate(
    gallery: Path,
    queries_csv: Path,
    *,
    model: str,
    k: int = 10,
    center_on: str | None = None,
    workers: int | None = None,
    quiet: bool = True,
    regions: bool = False,
    report: Path | None = None,
) -> dict[str, Any]:
    """Build a temporary index of ``gallery`` and score ``queries_csv`` against it.

    ``center_on`` is a folder/CSV of unlabelled in-domain photos to centre on, or the
    word ``queries`` to centre on the query images themselves (transductive).
    ``report`` is a folder for an HTML page of the results (:mod:`vsearch.report`),
    written while the temporary index still exists to show its images.
    """
    items = read_manifest(gallery)
    queries = read_queries(queries_csv)
    _prepare_report(report)
    with tempfile.TemporaryDirectory(prefix="vsearch-eval-") as tmp:
        center_path = None
        if center_on == "queries":
            center_path = Path(tmp) / "center.csv"
            center_path.write_text("id,image\n" + "".join(f"q{i},{q.image}\n" for i, q in enumerate(queries)))
        elif center_on:
            center_path = Path(center_on)
        with Engine.open(Path(tmp) / "index", model=model, create=True) as engine:
            ingested = engine.ingest(items, center_on=center_path, workers=workers, quiet=quiet)
            if engine.info()["vectors"] == 0:
                first = ingested.rejected[0] if ingested.rejected else None
                detail = f"; first reject: {first.source}: {first.reason}" if first else ""
                raise EvalError(f"no gallery image of {gallery} could be used{detail}")
            return _measure(engine, queries, k, regions=regions, report=report)


def evaluate_index(
    index_dir: Path, queries_csv: Path, *, k: int = 10, regions: bool = False, report: Path | None = None
) -> dict[str, Any]:
    """Score ``queries_csv`` against an existing index, exactly as it serves
    (``report``: as :func:`evaluate`)."""
    queries = read_queries(queries_csv)
    _prepare_report(report)
    with Engine.open(index_dir) as engine:
        return _measure(engine, queries, k, regions=regions, report=report)


def _prepare_report(report: Path | None) -> None:
    """Fail on an unusable report folder before the slow part, not after it."""
    if report is not None:
        from .report import report_folder

        report_folder(report)


def _measure(
    engine: Engine, queries: list[LabelledQuery], k: int, *, regions: bool, report: Path | None = None
) -> dict[str, Any]:
    per_category: dict[str, int] = engine.catalog.category_counts()
    start = time.perf_counter()
    results = search_all(engine, queries, k=max(k, 10), regions=regions)
    elapsed = time.perf_counter() - start
    metrics = score(queries, results, per_category, k)
    metrics["images_per_s"] = round(len(queries) / elapsed, 2) if elapsed > 0 else 0.0
    if report is not None:
        from .report import write_report

        write_report(report, metrics, [QueryResult(q, hits) for q, hits in zip(queries, results)], engine)
    return metrics


def search_all(
    engine: Engine, queries: list[LabelledQuery], *, k: int, batch: int = 32, regions: bool = False
) -> list[list[Hit]]:
    """Decode in threads (PIL releases the GIL), embed and search a batch at a time."""
    results: list[list[Hit]] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(queries), batch):
            chunk = queries[start : start + batch]
            images = list(pool.map(lambda source: _load(engine, source), [q.image for q in chunk]))
            ok = [i for i, im in enumerate(images) if im is not None]
            found: list[list[Hit]] = [[] for _ in chunk]
            if ok and regions:
                for i in ok:
                    found[i] = engine.search_regions(images[i], SearchOptions(k=k))
            elif ok:
                snap = engine.snapshot  # embed and search with one model version
                raw = engine.embed_queries([images[i] for i in ok], snap)
                for i, hits in zip(ok, engine.search_vectors(raw, SearchOptions(k=k), snapshot=snap)):
                    found[i] = hits
            results.extend(found)
    return results


def _load(engine: Engine, source: str) -> Any:
    try:
        return engine.load_query(source)
    except ImageError:
        return None  # counted as a miss: an unreadable query retrieves nothing


def _average_precision(relevant: list[bool], n_relevant: int) -> float:
    if n_relevant == 0:
        return 0.0
    hits, total = 0, 0.0
    for rank, rel in enumerate(relevant, start=1):
        if rel:
            hits += 1
            total += hits / rank
    return total / n_relevant


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None

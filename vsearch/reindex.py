"""Re-embedding the catalog with a model version: only images that have no current
vector from it, a batch per SQLite transaction, so a stopped run resumes where it
stopped (the same crash-safety argument as :mod:`vsearch.ingest`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .catalog import Catalog, ImageRow
from .embed import Embedder, load_images

__all__ = ["ReindexReport", "embed_missing"]


@dataclass
class ReindexReport:
    model: str
    embedded: int = 0
    unreadable: int = 0
    changed: int = 0  # the file's content no longer matches the catalog: re-ingest it
    vectors: int = 0
    seconds: float = 0.0
    switched: bool = False

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def embed_missing(
    catalog: Catalog,
    get_embedder: Callable[[], Embedder],
    model: str,
    resolve: Callable[[ImageRow], str],
    *,
    bump: bool,
    batch_size: int = 32,
    workers: int | None = None,
    device: torch.device | None = None,
    quiet: bool = False,
) -> ReindexReport:
    """Embed every image lacking a ``model`` vector; ``bump`` says whether the
    served index depends on these vectors (the catalog generation then moves)."""
    start = time.perf_counter()
    report = ReindexReport(model)
    todo = catalog.images_without_vectors(model)
    if todo:
        embedder = get_embedder()
        bar = tqdm(total=len(todo), unit="img", desc=f"reindex {model}", disable=quiet or not sys.stderr.isatty())
        work = [(row, resolve(row), "") for row in todo]
        for batch in load_images(work, embedder.preprocess, batch_size=batch_size, workers=workers, device=device):
            ok = [loaded for loaded in batch if loaded.tensor is not None]
            report.unreadable += len(batch) - len(ok)
            if ok:
                vectors = embedder.embed_tensor(torch.stack([loaded.tensor for loaded in ok if loaded.tensor is not None]))
                rows = [(loaded.key.id, loaded.sha256, vector) for loaded, vector in zip(ok, vectors)]  # type: ignore[attr-defined]
                with catalog.transaction(bump=bump):
                    stored = catalog.put_vectors(model, rows)
                report.embedded += stored
                report.changed += len(rows) - stored
            bar.update(len(batch))
        bar.close()
    report.seconds = time.perf_counter() - start
    return report

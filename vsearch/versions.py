"""Model versions of an index directory: ``base`` (the model the index was built
with) and fine-tuned versions under ``DIR/models/NAME/``; listing, switching (with
re-embedding what a version lacks), removing, and adopting a switch that another
process made.

A version directory is written under a temporary name and renamed into place, so
it is either complete or absent. Which version serves is the manifest's
``active_model``. Each version's vectors stay in the catalog, so switching back is
quick; a switch builds the new snapshot aside and installs it with one swap.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .adapter import ADAPTER_FILE, AdaptedEmbedder, AdapterConfig
from .catalog import BASE_MODEL, ImageRow
from .embed import Embedder, LoadedImage, pick_device
from .errors import IndexFormatError, IndexNotFoundError, ModelError, VersionError
from .fsutil import _fsync_dir
from .gallery import GalleryWeights
from .ingest import embed_batches
from .manifest import IndexManifest, IndexPaths
from .projection import Projection

if TYPE_CHECKING:
    from .engine import Engine
    from .writer import IndexWriter

__all__ = [
    "BASE_MODEL",
    "ReindexReport",
    "VersionInfo",
    "check_name",
    "embedder_loader",
    "gallery_for",
    "list_versions",
    "next_version_name",
    "projection_for",
    "refresh",
    "remove_model",
    "use_model",
    "version_dir",
    "write_version",
]

_log = logging.getLogger("vsearch")
REPORT_FILE = "report.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class VersionInfo:
    name: str
    active: bool
    created_at: float | None
    summary: dict[str, Any]  # from the training report: best epoch, validation Recall@1, ...

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "active": self.active, "created_at": self.created_at, **self.summary}


def models_dir(root: Path) -> Path:
    return root / "models"


def check_name(name: str) -> str:
    if not _NAME.match(name) or name == BASE_MODEL:
        raise VersionError(f"bad version name {name!r}: letters, digits, '.', '_' or '-', not {BASE_MODEL!r}")
    return name


def version_dir(root: Path, name: str) -> Path:
    """The folder of fine-tuned version ``name``; it must exist and be complete."""
    folder = models_dir(root) / check_name(name)
    if not (folder / ADAPTER_FILE).is_file():
        known = ", ".join(v.name for v in list_versions(root, ""))
        raise VersionError(f"no model version {name!r} in {root} (versions: {known})")
    return folder


def list_versions(root: Path, active: str) -> list[VersionInfo]:
    out = [VersionInfo(BASE_MODEL, active == BASE_MODEL, None, {"kind": "pretrained"})]
    folder = models_dir(root)
    if not folder.is_dir():
        return out
    for entry in sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime):
        if entry.name.startswith(".") or not (entry / ADAPTER_FILE).is_file():
            continue
        summary: dict[str, Any] = {"kind": "fine-tuned"}
        try:
            report = json.loads((entry / REPORT_FILE).read_text())
            summary.update({k: report.get(k) for k in ("best_epoch", "val_recall_at_1", "val_recall_at_10", "seconds")})
            summary["trained_on"] = report.get("data", {}).get("train_photos")
        except (OSError, json.JSONDecodeError):
            pass
        out.append(VersionInfo(entry.name, entry.name == active, (entry / ADAPTER_FILE).stat().st_mtime, summary))
    return out


def next_version_name(root: Path) -> str:
    folder = models_dir(root)
    taken = {p.name.lstrip(".").removeprefix("partial-") for p in folder.glob("*")} if folder.exists() else set()
    n = 1
    while f"ft-{n:03d}" in taken:
        n += 1
    return f"ft-{n:03d}"


def write_version(root: Path, name: str, write: Callable[[Path], None]) -> Path:
    """Create version ``name``: ``write(tmp_folder)`` fills a temporary folder, which
    then becomes ``DIR/models/NAME`` in one rename."""
    final = models_dir(root) / check_name(name)
    if final.exists():
        raise VersionError(f"model version {name!r} exists already in {root}")
    tmp = models_dir(root) / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for path in tmp.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def remove_version_dir(root: Path, name: str) -> None:
    shutil.rmtree(version_dir(root, name))


# serving a version --------------------------------------------------------------------
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


def embedder_loader(paths: IndexPaths, manifest: IndexManifest, name: str, device: str | None) -> Callable[[], Embedder]:
    """How to load version ``name``'s embedder (called on first use)."""
    if name == BASE_MODEL:
        return lambda: Embedder(manifest.model, device=device)
    # The folder is checked when the model is needed, so an index whose active
    # version went missing still opens (and can switch back to base).
    return lambda: AdaptedEmbedder(version_dir(paths.root, name), device=device)


def gallery_for(paths: IndexPaths, name: str) -> GalleryWeights | None:
    """How version ``name`` reweights its catalog vectors per product
    (:mod:`vsearch.gallery`); None where it does not (base, class-level and older
    versions)."""
    if name == BASE_MODEL:
        return None
    folder = models_dir(paths.root) / check_name(name)
    try:
        adapter = AdapterConfig.load(folder)
    except ModelError:
        return None  # a missing version: the index still opens, to switch back (embedder_loader)
    if adapter.untrained_weight is None:
        return None
    try:
        return GalleryWeights.load(folder, adapter.head_dim, adapter.zero_shot_weight, adapter.untrained_weight)
    except ModelError as exc:  # the index must still open (and serve, or switch back): as before the blend
        _log.warning("vsearch: %s; every catalog image is indexed with the version's own blend", exc)
        return None


def projection_for(paths: IndexPaths, name: str, manifest: IndexManifest | None = None) -> Projection:
    """The projection version ``name`` serves with; with ``manifest``, checked against
    it (a fitted projection that is missing or of the wrong size is a damaged index)."""
    # A fine-tuned version's vectors come out final (its zero-shot part carries the
    # base projection it was trained with), so only renormalisation is left.
    if name != BASE_MODEL:
        return Projection()
    projection = Projection.load(paths.projection)
    if manifest is not None and manifest.projection_fitted and manifest.raw_dim:
        if projection.fitted_on == 0 or projection.out_dim(manifest.raw_dim) != manifest.dim:
            raise IndexFormatError(
                f"{paths.projection} is missing or does not match the index ({manifest.dim} dimensions); "
                f"fit it again: vsearch ingest SOURCE --index {paths.root} --center-on PHOTOS"
            )
    return projection


def use_model(
    engine: Engine, name: str, *, quiet: bool = False, workers: int | None = None, batch_size: int = 32
) -> ReindexReport:
    """Serve model version ``name``: embed every image that has no vector from it yet
    (resumable: a batch per transaction), build its index, then swap it in.

    Searches go on meanwhile with the current snapshot; the old version's vectors
    stay, so switching back is quick.
    """
    start = time.perf_counter()
    report = ReindexReport(name)
    with engine.writer() as writer:
        current = writer.snapshot
        same = name == current.model
        snap = current if same else engine.new_snapshot(name, projection_for(engine.paths, name), None)  # lazy model
        todo = engine.catalog.images_without_vectors(name)

        def commit(loaded: list[LoadedImage], vectors: np.ndarray) -> None:
            rows = [(x.key.id, x.sha256, v) for x, v in zip(loaded, vectors)]  # type: ignore[attr-defined]
            stored = writer.store_vectors(name, rows)
            report.embedded += stored
            report.changed += len(rows) - stored

        def skip(loaded: LoadedImage) -> None:
            report.unreadable += 1

        embed_batches(
            [(row, _local_source(engine, row), "") for row in todo],
            snap.embedder,
            engine.preprocess,
            commit=commit,
            skip=skip,
            batch_size=batch_size,
            workers=workers,
            device=pick_device(engine.device),
            desc=f"reindex {name}",
            quiet=quiet,
        )
        index, generation = writer.build_index(snap.projection, name, snap.gallery)
        raw_dim = engine.catalog.vector_dim(name)
        new = engine.new_snapshot(name, snap.projection, index, like=snap)
        writer.swap(new, generation, active_model=name, raw_dim=raw_dim, dim=snap.projection.out_dim(raw_dim))
    report.vectors, report.switched = new.vectors, not same
    report.seconds = time.perf_counter() - start
    return report


def remove_model(engine: Engine, name: str) -> None:
    """Delete a fine-tuned version and its vectors (not the active one, not base)."""
    with engine.writer() as writer:
        if name == BASE_MODEL:
            raise VersionError("the base model cannot be removed")
        if name == writer.snapshot.model:
            raise VersionError(f"model version {name!r} is active; switch first: vsearch model use base")
        version_dir(engine.paths.root, name)
        writer.drop_model_vectors(name)
        remove_version_dir(engine.paths.root, name)


def refresh(engine: Engine) -> bool:
    """Follow what other processes did to the index directory (e.g. ``vsearch
    ingest`` or ``vsearch reindex`` beside ``vsearch serve``): adopt a model switch
    or refit they saved, and apply the writes they committed to the catalog (from
    its change log, at the cost of the change). Returns True if anything changed.
    Cheap when nothing did: one small file read and one catalog row."""
    if _switched_elsewhere(engine) is not None:
        with engine.writer() as writer:
            disk = _switched_elsewhere(engine)  # again, now that no write of ours can land
            if disk is not None:
                _adopt(engine, writer, disk)
                return True
    if engine.snapshot.index is None or engine.catalog.generation == engine.index_generation:
        return False
    with engine.writer() as writer:
        if not writer.catch_up():  # further behind than the log reaches: start from the saved index
            _adopt(engine, writer, IndexManifest.load(engine.paths))
    return True


def _adopt(engine: Engine, writer: IndexWriter, disk: IndexManifest) -> None:
    """Serve the state ``disk`` describes: its saved index caught up with the
    catalog, or one built from the catalog if that cannot be."""
    name = disk.active_model
    projection = projection_for(engine.paths, name)
    gallery = gallery_for(engine.paths, name)
    index, generation = engine.saved_index(disk), disk.catalog_generation
    if index is None:
        index, generation = writer.build_index(projection, name, gallery)
    writer.swap(engine.new_snapshot(name, projection, index, like=writer.snapshot), generation, manifest=disk)
    if not writer.catch_up():
        writer.rebuild()


def _switched_elsewhere(engine: Engine) -> IndexManifest | None:
    """The manifest on disk if another process has since switched the directory to
    another model version or projection."""
    try:
        disk = IndexManifest.load(engine.paths)
    except (IndexFormatError, IndexNotFoundError):
        return None
    if disk.catalog_generation == -1 or disk.updated_at <= engine.manifest.updated_at:
        return None  # mid-save elsewhere, or our own save
    return disk if disk.state_id != engine.manifest.state_id else None


def _local_source(engine: Engine, row: ImageRow) -> str:
    stored = engine.image_store.path(row.sha256)
    return str(stored) if stored is not None else row.source

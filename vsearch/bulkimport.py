"""Precomputed embeddings in and out: Parquet shards -> catalog and index, through the
write path (:func:`import_shards`, ``vsearch import``), and an index's images with
their stored vectors -> one Parquet file (:func:`export_parquet`, ``vsearch export``).

A shard has one row per image:

* ``id`` (product id), ``image`` (the image's source: an absolute path, an http(s)
  URL, or a path relative to the shard's folder), ``sha256`` (of the image's bytes)
  and ``vector`` (a list of floats: the raw vector of the index's model version,
  before any projection, ``raw_dim`` numbers in ``vsearch info`` and ``vsearch models --json``);
* optionally ``category``, ``title``, ``width`` and ``height`` (pixels; 0 if absent);
  every other column becomes a product attribute (a null cell: not given).

Shard metadata ``vsearch.model`` and ``vsearch.model_version`` (written by the
export) must name the index's model and served version when present. Every shard is
checked (columns, model, the first vector's length) before anything is stored.

Vectors are L2-normalised, as the embedder's are, and stored like ingested ones: the
result is the catalog and index ``vsearch ingest`` of the same images builds
(``tests/test_import.py``). Shards are read a batch at a time
(``ParquetFile.iter_batches``); each batch is one ``IndexWriter.add_images``
transaction, the index is saved every 30 s and, at the end, ``w.finish()`` fits the
projection the first time. A row whose product, source and sha256 are stored
already is skipped (its product fields too), so a run killed midway, run again,
adds only the rest.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from .catalog import BASE_MODEL
from .config import IndexConfig, ProjectionConfig
from .errors import ConfigError, ManifestError
from .fsutil import atomic_write_bytes
from .images import is_url
from .ingest import merge_products
from .manifest import IndexPaths
from .projection import l2_normalize
from .sources import Item
from .variants import from_signed, to_signed
from .writer import NewImage

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["ImportReject", "ImportReport", "export_parquet", "import_shards", "open_index", "shard_model", "shard_schema"]

REQUIRED = ("id", "image", "sha256", "vector")
RESERVED = (*REQUIRED, "category", "title", "width", "height", "phash")
META_MODEL = b"vsearch.model"
META_VERSION = b"vsearch.model_version"
CHECKPOINT_EVERY_S = 30.0


@dataclass(frozen=True)
class ImportReject:
    shard: str
    row: int  # 0-based row number in the shard
    product_id: str
    source: str
    reason: str


@dataclass
class ImportReport:
    shards: int = 0
    rows: int = 0
    added: int = 0
    unchanged: int = 0  # product, source and sha256 stored already: skipped
    duplicates: int = 0  # rows repeating a later row's product id and image in the same batch: ignored
    rejected: list[ImportReject] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def failed(self) -> bool:
        """Every row was rejected: nothing stored, nothing found unchanged."""
        return bool(self.rejected) and self.added == 0 and self.unchanged == 0

    def to_dict(self) -> dict[str, object]:
        return {
            "shards": self.shards,
            "rows": self.rows,
            "added": self.added,
            "unchanged": self.unchanged,
            "duplicates": self.duplicates,
            "rejected": len(self.rejected),
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows_per_s, 1),
            "rejects": [r.__dict__ for r in self.rejected[:1000]],
        }


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.compute  # noqa: F401 - loads pa.compute
        import pyarrow.parquet  # noqa: F401 - loads pa.parquet
    except ImportError:
        raise ConfigError("Parquet import and export need pyarrow: pip install 'vsearch[parquet]'") from None
    return pa


# import ------------------------------------------------------------------------------
def shard_model(shards: Sequence[str | os.PathLike[str]]) -> str | None:
    """The model the first shard says its vectors come from (``vsearch.model``), if any."""
    pa = _pyarrow()
    for path in shards[:1]:
        meta = _open(pa, Path(path)).schema_arrow.metadata or {}
        if META_MODEL in meta:
            return str(meta[META_MODEL].decode())
    return None


def open_index(
    index_dir: str | os.PathLike[str],
    shards: Sequence[str | os.PathLike[str]],
    *,
    model: str | None = None,
    projection: ProjectionConfig | None = None,
    index: IndexConfig | None = None,
    device: str | None = None,
) -> Engine:
    """Open ``index_dir`` for an import, creating it if missing for ``model`` (default:
    the shards' ``vsearch.model``, else the default model). An existing index keeps its
    model; :func:`import_shards` checks each shard against it."""
    from .engine import Engine

    if model is None and not IndexPaths(Path(index_dir)).manifest.exists():
        model = shard_model(shards)
    return Engine.open(index_dir, model=model, projection=projection, index=index, create=True, device=device)


def import_shards(
    engine: Engine,
    shards: Sequence[str | os.PathLike[str]],
    *,
    batch_size: int = 4096,
    quiet: bool = False,
    checkpoint_every_s: float = CHECKPOINT_EVERY_S,
) -> ImportReport:
    """Store the rows of Parquet ``shards`` (see the module docstring) in ``engine``'s
    catalog and index; rows stored already are skipped. Every shard is checked before
    anything is stored: a missing column, another model or a vector of the wrong length
    is a :class:`~vsearch.errors.ManifestError` naming the file. Rows that cannot be
    used (a null field, a vector of another length, not finite or all zeros) are
    rejected and listed in the report and ``DIR/rejects.jsonl``."""
    pa = _pyarrow()
    start = time.perf_counter()
    paths = [Path(p) for p in shards]
    dim = _expected_dim(engine)
    files = [_checked(pa, engine, path, dim) for path in paths]
    report = ImportReport(shards=len(paths))
    total = sum(f.metadata.num_rows for f in files)
    bar = tqdm(total=total, unit="row", desc="import", disable=quiet or not sys.stderr.isatty(), smoothing=0.1)
    last_save = time.monotonic()
    with engine.writer() as writer:
        for path, parquet in zip(paths, files):
            attributes = [n for n in parquet.schema_arrow.names if n not in RESERVED]
            row = 0
            for batch in parquet.iter_batches(batch_size=batch_size):
                rows, vectors = _rows(pa, batch, path, row, dim, attributes, report)
                rows, vectors = _new(engine, rows, vectors, report)
                if rows:
                    images = [NewImage(r.item.product_id, r.item.image, r.sha256, r.width, r.height, r.phash) for r in rows]
                    products = list(merge_products([r.item for r in rows]).values())
                    writer.add_images(images, vectors, products=products)
                    report.added += len(rows)
                row += batch.num_rows
                report.rows += batch.num_rows
                bar.update(batch.num_rows)
                if time.monotonic() - last_save > checkpoint_every_s:
                    writer.save()
                    last_save = time.monotonic()
        bar.close()
        lines = "".join(json.dumps(r.__dict__) + "\n" for r in report.rejected)
        atomic_write_bytes(engine.paths.rejects, lines.encode())
        writer.finish()  # fits the projection the first time, upgrades the index type when outgrown, saves
    report.seconds = time.perf_counter() - start
    return report


@dataclass(frozen=True)
class _Row:
    item: Item
    sha256: str
    width: int
    height: int
    phash: int | None  # unsigned; None where the shard has none


def _expected_dim(engine: Engine) -> int:
    """The length of the served version's raw vectors: from the catalog or the
    manifest, or, in an index with none yet, from the base model's architecture
    (random weights: nothing downloaded) or a fine-tuned version itself (loaded once)."""
    snap = engine.snapshot
    dim = snap.raw_dim or (engine.manifest.raw_dim if snap.model == BASE_MODEL else 0)
    if dim:
        return dim
    from .embed import raw_dim  # torch: only when needed

    return raw_dim(engine.manifest.model) if snap.model == BASE_MODEL else snap.embedder.get().dim


def shard_schema(pa: Any, engine: Engine, attributes: dict[str, Any]) -> Any:
    """The Parquet schema of a shard :func:`import_shards` reads, for the engine's
    served model version, with ``attributes`` (column name -> pyarrow type) after the
    fixed columns: what ``vsearch export`` and ``vsearch ingest --ray`` write."""
    fixed = [("id", pa.string()), ("image", pa.string()), ("sha256", pa.string()), ("vector", pa.list_(pa.float32()))]
    fixed += [("category", pa.string()), ("title", pa.string()), ("width", pa.int32()), ("height", pa.int32())]
    fixed += [("phash", pa.int64())]  # signed, as SQLite keeps it; null or 0 (no real pHash is 0): none
    meta = {META_MODEL: engine.manifest.model.name.encode(), META_VERSION: engine.active.encode()}
    return pa.schema([*fixed, *attributes.items()], metadata=meta)


def _open(pa: Any, path: Path) -> Any:
    if not path.is_file():
        raise ManifestError(f"{path}: no such file")
    try:
        return pa.parquet.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise ManifestError(f"{path}: not a readable Parquet file: {exc}") from None


def _checked(pa: Any, engine: Engine, path: Path, dim: int) -> Any:
    """``path`` opened, once its columns, model and first vector fit ``engine``."""
    parquet = _open(pa, path)
    schema = parquet.schema_arrow
    missing = [c for c in REQUIRED if c not in schema.names]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(schema.names)})")
    kind = schema.field("vector").type
    if not _is_list(pa, kind) or not (pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)):
        raise ManifestError(f"{path}: column vector must be a list of floats, not {kind}")
    meta = schema.metadata or {}
    model, version = engine.manifest.model.name, engine.active
    if META_MODEL in meta and meta[META_MODEL].decode() != model:
        raise ManifestError(
            f"{path}: vectors of model {meta[META_MODEL].decode()!r}, but {engine.paths.root} uses {model!r}; "
            "import into an index of that model"
        )
    if version != (meta[META_VERSION].decode() if META_VERSION in meta else BASE_MODEL):
        shard_version = meta.get(META_VERSION, BASE_MODEL.encode()).decode()
        raise ManifestError(
            f"{path}: vectors of model version {shard_version!r}, but {engine.paths.root} serves {version!r}; "
            f"switch first (vsearch model use {shard_version})"
        )
    first = _first_length(pa, parquet)
    if first is not None and first != dim:
        raise ManifestError(
            f"{path}: vectors have {first} numbers, but model {model!r} (version {version}) of {engine.paths.root} "
            f"makes {dim} (raw_dim); nothing was imported"
        )
    return parquet


def _is_list(pa: Any, kind: Any) -> bool:
    return bool(pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind))


def _first_length(pa: Any, parquet: Any) -> int | None:
    """The length of the shard's first non-null vector (None if it has none)."""
    kind = parquet.schema_arrow.field("vector").type
    if pa.types.is_fixed_size_list(kind):
        return int(kind.list_size)
    for batch in parquet.iter_batches(batch_size=1024, columns=["vector"]):
        lengths = pa.compute.list_value_length(batch.column(0)).drop_null()
        if len(lengths):
            return int(lengths[0].as_py())
    return None


def _rows(
    pa: Any, batch: Any, path: Path, first_row: int, dim: int, attributes: list[str], report: ImportReport
) -> tuple[list[_Row], np.ndarray]:
    """A batch's usable rows and their L2-normalised float32 vectors; the others go to
    ``report.rejected``."""
    n = batch.num_rows
    column = batch.column("vector")
    lengths = pa.compute.list_value_length(column).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pa.compute.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    starts = np.concatenate([[0], np.cumsum(np.maximum(lengths, 0))[:-1]]) if n else np.zeros(0, dtype=np.int64)
    good = lengths == dim
    vectors = np.zeros((n, dim), dtype=np.float32)
    if good.all():
        vectors = flat.reshape(n, dim)
    elif good.any():
        vectors[good] = flat[starts[good, None] + np.arange(dim)]
    norms = np.linalg.norm(vectors, axis=1)
    ids, sources, sha256s = (batch.column(c).to_pylist() for c in ("id", "image", "sha256"))
    optional = {c: batch.column(c).to_pylist() if c in batch.schema.names else [None] * n for c in RESERVED[4:]}
    extra = {c: batch.column(c).to_pylist() for c in attributes}
    rows: list[_Row] = []
    keep: list[int] = []
    for i in range(n):
        pid, source, sha256 = (str(v).strip() if v is not None else "" for v in (ids[i], sources[i], sha256s[i]))
        reason = ""
        if not pid or not source or not sha256:
            reason = f"empty {'id' if not pid else 'image' if not source else 'sha256'}"
        elif lengths[i] < 0:
            reason = "no vector"
        elif not good[i]:
            reason = f"vector has {lengths[i]} numbers, expected {dim}"
        elif not np.isfinite(norms[i]):
            reason = "vector is not finite"
        elif norms[i] == 0:
            reason = "vector is all zeros"
        if reason:
            report.rejected.append(ImportReject(str(path), first_row + i, pid, source, reason))
            continue
        if not is_url(source):
            source = str((path.parent / source).resolve())
        category, title = optional["category"][i], optional["title"][i]
        item = Item(
            pid,
            source,
            category=str(category).strip().strip("/") or None if category is not None else None,
            title=str(title).strip() or None if title is not None else None,
            attributes={k: _plain(v[i]) for k, v in extra.items() if v[i] is not None} if attributes else None,
        )
        width, height, phash = (optional[c][i] or 0 for c in ("width", "height", "phash"))
        rows.append(_Row(item, sha256, int(width), int(height), from_signed(int(phash)) if phash else None))
        keep.append(i)
    return rows, l2_normalize(vectors[keep])


def _plain(value: Any) -> Any:
    """``value`` as the catalog can store it (JSON): dates, decimals, bytes as text."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


def _new(engine: Engine, rows: list[_Row], vectors: np.ndarray, report: ImportReport) -> tuple[list[_Row], np.ndarray]:
    """Those of ``rows`` not stored already (same product, source and content); of
    rows repeating a product id and image within the batch, the last."""
    last: dict[tuple[str, str], int] = {}
    for n, row in enumerate(rows):
        last[(row.item.product_id, row.item.image)] = n
    report.duplicates += len(rows) - len(last)
    keep = []
    for n in sorted(last.values()):
        row = rows[n]
        stored = engine.catalog.image(row.item.product_id, row.item.image)
        if stored is not None and stored.sha256 == row.sha256:
            report.unchanged += 1
        else:
            keep.append(n)
    return [rows[n] for n in keep], vectors[keep]


# export ------------------------------------------------------------------------------
def export_parquet(engine: Engine, out: str | os.PathLike[str], *, batch_size: int = 4096) -> int:
    """Write every image that has a vector from the served model version, with its
    product's fields and that raw vector, to the Parquet file ``out`` (written aside,
    then renamed into place), in image id order; returns how many rows. Importing it
    into a new index of the same model rebuilds this one."""
    pa = _pyarrow()
    out = Path(out)
    catalog, model = engine.catalog, engine.active
    tmp = out.with_name(f".{out.name}.tmp")
    rows = 0
    with catalog.reading():  # one consistent state throughout
        columns = _attribute_types(pa, engine)
        schema = shard_schema(pa, engine, columns)
        try:
            with pa.parquet.ParquetWriter(tmp, schema) as writer:
                for ids, raw in catalog.iter_vectors(batch_size, model=model):
                    writer.write_batch(_export_batch(pa, engine, schema, columns, ids, raw))
                    rows += len(ids)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return rows


def _attribute_types(pa: Any, engine: Engine) -> dict[str, Any]:
    """One column per attribute any product has: bool, int64, float64 or (otherwise,
    values as JSON text where they are not strings) string."""
    kinds: dict[str, set[type]] = {}
    for chunk in _chunks(sorted(engine.catalog.product_ids()), 10_000):
        for product in engine.catalog.products(chunk).values():
            for key, value in product.attributes.items():
                kinds.setdefault(key, set()).add(type(value))
    clash = sorted(set(kinds) & set(RESERVED))
    if clash:
        raise ConfigError(f"attribute(s) {', '.join(clash)} would clash with the shard's own columns; rename them first")
    types: dict[str, Any] = {}
    for key in sorted(kinds):
        seen = kinds[key] - {type(None)}
        if seen == {bool}:
            types[key] = pa.bool_()
        elif seen == {int}:
            types[key] = pa.int64()
        elif seen and seen <= {int, float}:
            types[key] = pa.float64()
        else:
            types[key] = pa.string()
    return types


def _export_batch(pa: Any, engine: Engine, schema: Any, columns: dict[str, Any], ids: np.ndarray, raw: np.ndarray) -> Any:
    images = [engine.catalog.image_by_id(int(i)) for i in ids]
    products = engine.catalog.products(sorted({r.product_id for r in images if r is not None}))
    data: dict[str, list[Any]] = {name: [] for name in schema.names if name != "vector"}
    for row in images:
        assert row is not None  # the vector's image, read in the same transaction
        product = products[row.product_id]
        for name, value in (
            ("id", row.product_id),
            ("image", row.source),
            ("sha256", row.sha256),
            ("category", product.category),
            ("title", product.title),
            ("width", row.width),
            ("height", row.height),
            ("phash", to_signed(row.phash)),
        ):
            data[name].append(value)
        for key, kind in columns.items():
            attribute = product.attributes.get(key)
            if kind == pa.string() and attribute is not None and not isinstance(attribute, str):
                attribute = json.dumps(attribute, ensure_ascii=False)
            data[key].append(attribute)
    vectors = np.ascontiguousarray(raw, dtype=np.float32)
    offsets = np.arange(0, vectors.size + 1, vectors.shape[1] or 1, dtype=np.int32)[: len(ids) + 1]
    arrays = {name: pa.array(values, type=schema.field(name).type) for name, values in data.items()}
    arrays["vector"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(vectors.ravel()))
    return pa.record_batch([arrays[name] for name in schema.names], schema=schema)


def _chunks(values: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(values), size):
        yield values[i : i + size]

"""The shards of ``vsearch ingest --ray`` (:mod:`vsearch.rayingest`): the vectors that
came back, written by the driver as Parquet in the ``vsearch import`` format
(:mod:`vsearch.bulkimport`) to ``DIR/ray-shards/<version>-<key>/``, one folder per
source and model, so that an interrupted run's successor finds them.

A shard is written under a temporary name and renamed (whole or absent), every
:data:`SHARD_ROWS` vectors or :data:`FLUSH_EVERY_S` seconds. Each row carries its
product's merged fields (category, title and, where a column can hold them as the
source gives them, attributes) and the metadata names the index's model and version.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .bulkimport import RESERVED, shard_schema
from .errors import IndexBusyError, StorageError
from .fsutil import atomic_write
from .sources import Item

if TYPE_CHECKING:
    from .engine import Engine

__all__ = [
    "FLUSH_EVERY_S",
    "RUNS_DIR",
    "SHARD_ROWS",
    "Columns",
    "Shards",
    "keep_verified",
    "next_number",
    "old_shards",
    "run_dir",
    "run_lock",
    "write_shard",
]

_log = logging.getLogger(__name__)

RUNS_DIR = "ray-shards"
SHARD_ROWS = 4096  # vectors per shard (about 20 MB at 1280 floats)
FLUSH_EVERY_S = 30.0  # ... or what came back in this many seconds: a crash loses at most that


class Columns:
    """How rows become shard columns: ``vsearch import``'s format, each row with its
    product's merged fields, and the index's model in the metadata."""

    def __init__(self, pa: Any, engine: Engine, ordered: list[Item], products: dict[str, Item]) -> None:
        self.pa, self.ordered, self.products = pa, ordered, products
        given = [p.attributes for p in products.values()]
        keys = sorted({k for a in given for k in (a or {})})
        # A null cell means "not given", so a product whose rows give no attributes at
        # all (keep the catalog's) cannot sit beside ones that do: then the shards carry
        # none, and the products get them from the source after the import.
        self.lossy = bool(keys) and (any(a is None for a in given) or any(k in RESERVED for k in keys))
        keys = [] if self.lossy else keys
        self.attributes = {k: self._kind([(a or {}).get(k) for a in given]) for k in keys}
        self.schema = shard_schema(pa, engine, self.attributes)

    def _kind(self, values: list[Any]) -> Any:
        pa = self.pa
        seen = {type(v) for v in values} - {type(None)}
        if seen == {bool}:
            return pa.bool_()
        if seen == {int}:
            return pa.int64()
        if seen and seen <= {int, float}:
            return pa.float64()
        if seen - {str}:
            self.lossy = True  # stored as JSON text by the import; the source's values are put back after it
        return pa.string()

    def table(
        self, ns: np.ndarray, sha256: np.ndarray, width: np.ndarray, height: np.ndarray, phash: np.ndarray, vectors: np.ndarray
    ) -> Any:
        pa = self.pa
        items = [self.ordered[int(n)] for n in ns]
        merged = [self.products[i.product_id] for i in items]
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(items), -1)
        offsets = np.arange(0, vectors.size + 1, max(1, vectors.shape[1]), dtype=np.int32)[: len(items) + 1]
        data = {
            "id": [i.product_id for i in items],
            "image": [i.image for i in items],
            "sha256": [str(s) for s in sha256],
            "category": [p.category for p in merged],
            "title": [p.title for p in merged],
            "width": [int(w) for w in width],
            "height": [int(h) for h in height],
            "phash": [int(h) for h in phash],  # signed; 0: none
        }
        for key, kind in self.attributes.items():
            values = [(p.attributes or {}).get(key) for p in merged]
            if kind == pa.string():
                values = [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values]
            data[key] = values
        arrays = {name: pa.array(values, type=self.schema.field(name).type) for name, values in data.items()}
        arrays["vector"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(vectors.ravel()))
        return pa.Table.from_arrays([arrays[name] for name in self.schema.names], schema=self.schema)


class Shards:
    """Vectors as they come back, written as numbered shards every SHARD_ROWS rows or
    FLUSH_EVERY_S seconds (a temporary name, then a rename: a shard is whole or absent)."""

    def __init__(self, pa: Any, folder: Path, columns: Columns) -> None:
        self.pa, self.folder, self.columns = pa, folder, columns
        self.next = next_number(folder)
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.rows = 0
        self.last = time.monotonic()

    def add(self, *part: np.ndarray) -> None:
        self.parts.append(part)
        self.rows += len(part[0])
        if self.rows >= SHARD_ROWS or time.monotonic() - self.last >= FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        joined = [np.concatenate(column) for column in zip(*self.parts)]
        table = self.columns.table(*joined)
        write_shard(self.pa, self.folder / f"shard-{self.next:06d}.parquet", table)
        self.next += 1
        self.parts, self.rows, self.last = [], 0, time.monotonic()


def next_number(folder: Path) -> int:
    return max((int(p.stem.split("-")[1]) for p in folder.glob("shard-*.parquet")), default=-1) + 1


def write_shard(pa: Any, path: Path, table: Any) -> None:
    try:
        atomic_write(path, lambda tmp: pa.parquet.write_table(table, tmp))
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None


def run_dir(engine: Engine, source: str | os.PathLike[str] | Sequence[Item], ordered: list[Item]) -> Path:
    """``DIR/ray-shards/<version>-<key>``: the same for every run of one source with
    one model, so a re-run finds what an interrupted one left."""
    if isinstance(source, (str, os.PathLike)):
        what = str(Path(source).resolve())
    else:
        what = hashlib.sha256("\n".join(f"{i.product_id}\t{i.image}" for i in ordered).encode()).hexdigest()
    model = json.dumps({"source": what, "model": engine.manifest.model.to_dict(), "version": engine.active}, sort_keys=True)
    key = hashlib.sha256(model.encode()).hexdigest()[:16]
    folder = engine.paths.root / RUNS_DIR / f"{engine.active}-{key}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "run.json").write_text(
            json.dumps({"source": what, "model": engine.manifest.model.name, "version": engine.active})
        )
    except OSError as exc:
        raise StorageError(f"cannot write {folder}: {exc.strerror or exc}") from None
    return folder


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """One run per shard folder at a time (an flock the kernel drops if we die)."""
    folder.mkdir(parents=True, exist_ok=True)  # again: a run that just finished removes it
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexBusyError(f"another `vsearch ingest --ray` of this source is writing {folder}; let it finish") from None
        yield
    finally:
        os.close(fd)


def old_shards(pa: Any, folder: Path) -> dict[tuple[str, str], str]:
    """(product id, image) -> sha256 of the rows an interrupted run left (the newest
    shard's row where several have one); unreadable shards are set aside."""
    rows: dict[tuple[str, str], str] = {}
    for path in sorted(folder.glob("shard-*.parquet")):
        try:
            table = pa.parquet.read_table(path, columns=["id", "image", "sha256"])
        except (OSError, pa.ArrowException) as exc:
            _log.warning("vsearch: ignoring unreadable shard %s: %s", path, exc)
            with contextlib.suppress(OSError):
                path.rename(path.with_name(f"{path.name}.damaged"))
            continue
        for pid, image, sha in zip(*(table.column(c).to_pylist() for c in ("id", "image", "sha256"))):
            rows[(pid, image)] = sha
    return rows


def keep_verified(pa: Any, folder: Path, verified: set[tuple[str, str, str]], below: int) -> int:
    """Cut the shards an interrupted run left (numbered below ``below``) down to the
    rows this run found unchanged: the file still has the hash the row records. Returns
    how many rows are left to import."""
    kept = 0
    for path in sorted(folder.glob("shard-*.parquet")):
        if int(path.stem.split("-")[1]) >= below:
            continue
        table = pa.parquet.read_table(path)
        keys = zip(*(table.column(c).to_pylist() for c in ("id", "image", "sha256")))
        mask = [key in verified for key in keys]
        kept += sum(mask)
        if all(mask):
            continue
        if any(mask):
            write_shard(pa, path, table.filter(pa.array(mask)))
        else:
            path.unlink()
    return kept

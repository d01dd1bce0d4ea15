"""Finding a new image's near-duplicates: candidates from the served index, decided
by the rule of :mod:`vsearch.duplicates`, stored by :mod:`vsearch.variants`.

Each image is looked at once, when it is stored (or, if it was stored while there
was no index yet, the first time the writer finishes with one): its ``config.k``
nearest images in the served index are the candidates. That costs one k-NN search
per image, never a pass over the catalog.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence

import numpy as np

from . import duplicates
from .catalog import BASE_MODEL, Catalog
from .duplicates import DuplicateConfig
from .faissthreads import BATCH_MIN, one_thread
from .indexfile import indexed_vectors
from .snapshot import Snapshot
from .variants import PENDING_BATCH, from_signed, link, on, rows_in

__all__ = ["find_links", "link_pending"]


def link_pending(
    catalog: Catalog,
    snap: Snapshot,
    config: DuplicateConfig,
    image_ids: Sequence[int] | None,
    after: int = -1,
    batch: int = PENDING_BATCH,
) -> int:
    """Link pending images to their near-duplicates, inside the caller's transaction:
    those among ``image_ids``, or (None) the next ``batch`` with ids above ``after``.
    Returns the highest id looked at (-1: none were pending).

    Candidates are each image's ``config.k`` nearest in the served index; the
    embedding test runs on the base model's vectors only (the threshold was
    calibrated for them), the hash and sha256 tests always. An image with no vector
    from the served model yet stays pending. Needs an index (else nothing happens)."""
    if snap.index is None or snap.index.ntotal == 0:
        return -1
    conn = catalog.db.conn
    if image_ids is None:
        sql = "SELECT image_id FROM variant_pending WHERE image_id > ? ORDER BY image_id LIMIT ?"
        todo = [r[0] for r in conn.execute(sql, [after, batch])]
    else:
        todo = _pending_among(conn, sorted(set(image_ids)))
    if not todo:
        return -1
    ids, raw = catalog.vectors_by_id(todo, snap.model)
    if len(ids):
        _link_batch(catalog, snap, config, [int(i) for i in ids], raw)
        conn.executemany("DELETE FROM variant_pending WHERE image_id = ?", [(int(i),) for i in ids])
    return int(todo[-1])


def _link_batch(catalog: Catalog, snap: Snapshot, config: DuplicateConfig, ids: list[int], raw: np.ndarray) -> None:
    assert snap.index is not None
    conn = catalog.db.conn
    xq = snap.projection.apply(indexed_vectors(catalog, snap.gallery, np.array(ids, dtype=np.int64), raw))
    with one_thread(len(xq) < BATCH_MIN):  # a write's or a background batch's images: one core, as a shopper's query
        _, found = snap.index.search(xq, min(config.k + 1, snap.index.ntotal))  # +1: the image itself
    candidates = sorted({int(i) for i in found.ravel() if i >= 0} | set(ids))
    candidate_raw = None
    if snap.model == BASE_MODEL:
        got, vectors = catalog.vectors_by_id(candidates, BASE_MODEL)
        candidate_raw = {int(i): v for i, v in zip(got, vectors)}
    same = [(i, o) for i in ids for (o,) in conn.execute(_SAME_BYTES, [i, i, config.k])]
    link(conn, find_links(ids, raw, found, candidate_raw, _phashes(conn, candidates), same, config))


_SAME_BYTES = "SELECT o.id FROM images o WHERE o.sha256 = (SELECT sha256 FROM images WHERE id = ?) AND o.id != ? LIMIT ?"


def _pending_among(conn: sqlite3.Connection, ids: list[int]) -> list[int]:
    return sorted(r[0] for r in rows_in(on(conn), "SELECT image_id FROM variant_pending WHERE image_id IN ({marks})", ids))


def _phashes(conn: sqlite3.Connection, ids: list[int]) -> dict[int, int | None]:
    return {i: from_signed(h) for i, h in rows_in(on(conn), "SELECT id, phash FROM images WHERE id IN ({marks})", ids)}


def find_links(
    new_ids: Sequence[int],
    raw: np.ndarray,
    candidates: np.ndarray,
    candidate_raw: dict[int, np.ndarray] | None,
    phashes: dict[int, int | None],
    same_bytes: Iterable[tuple[int, int]],
    config: DuplicateConfig,
) -> set[tuple[int, int]]:
    """Near-duplicate pairs ``(a, b)``, ``a < b``, of new images ``new_ids`` (rows of
    ``raw``, their stored vectors) and their index ``candidates`` (one row of ids per
    image, -1 padded). ``candidate_raw``: the candidates' stored vectors, or None where
    the served model's vectors were not calibrated (the embedding test is skipped);
    ``phashes``: every image's hash; ``same_bytes``: pairs with one sha256 (always
    linked)."""
    pairs = {(min(a, b), max(a, b)) for a, b in same_bytes if a != b}
    for row, image in enumerate(new_ids):
        ids = [int(i) for i in candidates[row] if i >= 0 and i != image]
        sims = [_cosine(raw[row], candidate_raw[i]) if candidate_raw and i in candidate_raw else -1.0 for i in ids]
        mine = phashes.get(image)
        dists = [duplicates.hamming(mine, h) if mine is not None and (h := phashes.get(i)) is not None else 65 for i in ids]
        pairs.update((min(image, i), max(image, i)) for i in duplicates.near_duplicates(image, ids, sims, config, dists))
    return pairs


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float32), b.astype(np.float32)
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))

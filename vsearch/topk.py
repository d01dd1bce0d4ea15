"""Exact top-k lists: merging partial results, accumulating an exact search batch by
batch, and the recall of one list against another.

Vocabulary follows faiss: ``xb`` database vectors, ``xq`` queries, ``k`` neighbours,
``D`` scores and ``I`` ids, ``-1`` where fewer than k exist.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ExactTopK", "merge_topk", "recall_at_k"]


def merge_topk(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k best columns per row of concatenated partial results."""
    I = np.where(I < 0, -1, I)
    D = np.where(I < 0, -np.inf, D).astype(np.float32)
    if D.shape[1] > k:
        part = np.argpartition(-D, k - 1, axis=1)[:, :k]
        D, I = np.take_along_axis(D, part, 1), np.take_along_axis(I, part, 1)
    order = np.argsort(-D, axis=1, kind="stable")
    D, I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
    if D.shape[1] < k:
        pad = k - D.shape[1]
        D = np.pad(D, ((0, 0), (0, pad)), constant_values=-np.inf)
        I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
    return D, I


class ExactTopK:
    """The exact top-k ids of some queries over vectors fed a batch at a time (an
    index build's own pass over the catalog), for :func:`tune_nprobe`'s truth."""

    def __init__(self, xq: np.ndarray, k: int = 11) -> None:
        self.xq = np.ascontiguousarray(xq, dtype=np.float32)
        self.k = k
        self.D = np.full((len(xq), 0), -np.inf, dtype=np.float32)
        self.I = np.zeros((len(xq), 0), dtype=np.int64)

    def add(self, ids: np.ndarray, xb: np.ndarray) -> None:
        if len(ids) == 0 or len(self.xq) == 0:
            return
        scores = self.xq @ np.ascontiguousarray(xb, dtype=np.float32).T
        self.D, self.I = merge_topk(
            np.concatenate([self.D, scores], 1), np.concatenate([self.I, np.broadcast_to(ids, scores.shape)], 1), self.k
        )

    def others(self) -> np.ndarray:
        """Each query's nearest ids but the first (the query's own vector)."""
        return self.I[:, 1:]


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of each row's true top-k (``truth[:, :k]``, -1 ignored) found in
    ``found[:, :k]``: 10-recall@10 for k=10."""
    hits = total = 0
    for f, t in zip(found[:, :k], truth[:, :k]):
        t = t[t >= 0]
        hits += len(np.intersect1d(f, t))
        total += len(t)
    return hits / total if total else 1.0

"""What a server learns from its own traffic: it keeps a sample of the shoppers'
query embeddings (:class:`vsearch.reservoir.QueryReservoir`) and, once enough were
seen, refits the projection on them (:func:`vsearch.refit.refit_from_queries`), so
that a catalog with no labelled photos is centred on the photos shoppers send from
day one. Refits happen when ``refit_after_queries`` queries were seen, then at each
doubling (100, 200, 400, ... by default), off the request path."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import numpy as np

from .catalog import BASE_MODEL
from .errors import VsearchError
from .refit import MIN_QUERIES, refit_from_queries
from .reservoir import QueryReservoir

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["ProjectionLearner"]

log = logging.getLogger("vsearch")


class ProjectionLearner:
    def __init__(self, engine: Engine, capacity: int, refit_after: int) -> None:
        self.engine = engine
        self.refit_after = refit_after
        try:
            self.reservoir = QueryReservoir.load(engine.paths.queries, capacity, engine.snapshot.model)
        except VsearchError as exc:  # a damaged sample is not worth refusing to serve over
            log.warning("vsearch: %s; starting a new one", exc)
            self.reservoir = QueryReservoir(capacity, engine.snapshot.model)
        self.next_refit = self._first_due()
        self._lock = threading.Lock()  # one tick at a time

    def _first_due(self) -> int:
        """The count of queries seen at which the next refit is due: past the ones a
        refit on queries (before a restart) already covered."""
        due = max(self.refit_after, 1)
        if self.engine.snapshot.projection.fitted_from == "queries":
            while due <= self.reservoir.seen:
                due *= 2
        return due

    def offer(self, raw: np.ndarray, model: str) -> None:
        """Raw vectors of image queries, embedded by ``model`` (the request path: cheap)."""
        self.reservoir.add(raw, model)

    def tick(self, save: bool = True) -> bool:
        """From the server's background thread: refit if due, and (with ``save``) save
        the sample if it changed. Returns whether it refitted."""
        with self._lock:
            refitted = False
            if self.refit_after > 0 and self.reservoir.seen >= self.next_refit and self._can_refit():
                fitted = refit_from_queries(self.engine, self.reservoir, minimum=min(MIN_QUERIES, self.refit_after))
                log.warning("vsearch: projection refitted on %d shoppers' query photos", fitted)
                while self.next_refit <= self.reservoir.seen:
                    self.next_refit *= 2
                refitted = True
            if save and self.reservoir.dirty:
                self.reservoir.save(self.engine.paths.queries)
            return refitted

    def _can_refit(self) -> bool:
        """Only the base model's projection, and never one fitted on photos the merchant
        chose (``--center-on``): the automatic refit replaces the catalog's own fit or
        an earlier one on queries (``vsearch refit --from-queries`` still may)."""
        snap = self.engine.snapshot
        chosen = snap.projection.fitted_from == "photos"
        return self.reservoir.model == BASE_MODEL == snap.model and len(self.reservoir) > 0 and not chosen

    def close(self) -> None:
        with self._lock:
            if self.reservoir.dirty:
                self.reservoir.save(self.engine.paths.queries)

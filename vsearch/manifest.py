"""The index directory and its manifest: a folder that explains itself.

DIR/manifest.json   format version, model config, layers, pooling, projection,
                    dimension, faiss factory, its nprobe tuning, counts, catalog
                    generation
DIR/catalog.db      products, images and every model version's raw vectors (SQLite)
DIR/index.faiss     the faiss index (derived from the catalog; rebuilt if stale)
DIR/projection.npz  fitted centring/PCA
DIR/rejects.jsonl   what the last ingestion could not use, and why
DIR/write.lock      held by whichever process writes index.faiss, manifest.json or
                    projection.npz (vsearch.dirlock)
DIR/models/NAME/    fine-tuned model versions (weights, config, training report);
                    the manifest's active_model says which one serves
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .catalog import BASE_MODEL
from .config import IndexConfig, ModelConfig, ProjectionConfig
from .duplicates import DuplicateConfig
from .errors import IndexFormatError, IndexNotFoundError, VsearchError
from .fsutil import atomic_write_bytes
from .sizing import IndexTuning
from .version import __version__

__all__ = ["FORMAT_VERSION", "IndexManifest", "IndexPaths"]

# 2: model versions (active_model, DIR/models/). 3: catalog schema 2 (all model
# versions' vectors in one table); Catalog.open migrates a format 1 or 2 catalog.
# 4: catalog schema 3 (the change log), state_id, DIR/write.lock. Fields added
# since, optional, leave the format as it is: an older manifest loads with their
# default (tuning: None), and load ignores fields it does not know.
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)


@dataclass(frozen=True)
class IndexPaths:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.db"

    @property
    def index(self) -> Path:
        return self.root / "index.faiss"

    @property
    def projection(self) -> Path:
        return self.root / "projection.npz"

    @property
    def queries(self) -> Path:
        return self.root / "query_vectors.npz"

    @property
    def rejects(self) -> Path:
        return self.root / "rejects.jsonl"

    @property
    def write_lock(self) -> Path:
        return self.root / "write.lock"


@dataclass
class IndexManifest:
    model: ModelConfig
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    # when two images are near-duplicates (vsearch.duplicates); edit the file to tune it
    # for another model: new images are linked by the rule in force when they are stored
    duplicates: DuplicateConfig = field(default_factory=DuplicateConfig)
    raw_dim: int = 0
    dim: int = 0
    factory: str = ""
    # how build_index tuned the saved IVF index's nprobe (None: exact index, not tuned, or older manifest)
    tuning: IndexTuning | None = None
    projection_fitted: bool = False
    catalog_generation: int = -1
    active_model: str = BASE_MODEL  # which model version's vectors the index holds
    # which (model version, projection) the saved index is in; a switch or refit
    # changes it, so another process knows its own index is of another space
    state_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    counts: dict[str, int] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    vsearch_version: str = ""
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"] = self.model.to_dict()
        return data

    def save(self, paths: IndexPaths) -> None:
        self.vsearch_version = __version__
        self.updated_at = time.time()
        atomic_write_bytes(paths.manifest, (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    @classmethod
    def open(cls, paths: IndexPaths, model: ModelConfig | None, new: IndexManifest | None = None) -> IndexManifest:
        """The directory's manifest, checked against ``model`` (the one asked for, if
        any); or, where there is none and ``new`` is given, ``new``, saved there."""
        if paths.manifest.exists():
            manifest = cls.load(paths)
            if model is not None and model != manifest.model:
                raise IndexFormatError(
                    f"{paths.root} was built with model {manifest.model.name!r} {_describe(manifest.model)}, "
                    f"not {model.name!r} {_describe(model)}; use another --index for another model"
                )
            return manifest
        if new is None:
            raise IndexNotFoundError(f"no index at {paths.root} (build one with: vsearch ingest SOURCE --index {paths.root})")
        paths.root.mkdir(parents=True, exist_ok=True)
        new.save(paths)
        return new

    @classmethod
    def load(cls, paths: IndexPaths) -> IndexManifest:
        if not paths.manifest.exists():
            raise IndexNotFoundError(f"no index at {paths.root} (build one with: vsearch ingest SOURCE --index {paths.root})")
        try:
            data = json.loads(paths.manifest.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise IndexFormatError(f"{paths.manifest}: unreadable manifest: {exc}") from exc
        if not isinstance(data, dict):
            raise IndexFormatError(f"{paths.manifest}: damaged manifest: not a JSON object")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise IndexFormatError(
                f"{paths.root} has index format {version}, this vsearch reads format {FORMAT_VERSION}; rebuild the index"
            )
        # Format 1 is format 2 with only the base model; either's catalog is migrated
        # by Catalog.open, after which Engine.open saves the manifest as the current
        # format (format_version keeps what was read until then).
        try:
            data["model"] = ModelConfig.from_dict(data["model"])
            data["projection"] = ProjectionConfig(**data["projection"])
            data["index"] = IndexConfig(**{k: v for k, v in data["index"].items() if k != "extra"})  # formats 1-2 had extra: {}
            data["duplicates"] = DuplicateConfig(**data.get("duplicates", {}))  # absent from older manifests
            tuning = data.get("tuning")
            data["tuning"] = IndexTuning(**tuning) if tuning is not None else None
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, KeyError, AttributeError, ValueError, VsearchError) as exc:
            raise IndexFormatError(f"{paths.manifest}: damaged manifest: {type(exc).__name__}: {exc}") from None


def _describe(model: ModelConfig) -> str:
    return f"(layers {','.join(model.layers)}, pooling {','.join(model.poolings)})"

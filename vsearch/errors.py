"""The exceptions vsearch raises. Callers catch :class:`VsearchError`; the CLI and
API translate subclasses into exit codes and HTTP statuses at the edge."""

from __future__ import annotations

__all__ = [
    "VsearchError",
    "ConfigError",
    "ModelError",
    "ImageError",
    "ImageTooLargeError",
    "UnsupportedImageError",
    "ManifestError",
    "IndexNotFoundError",
    "IndexFormatError",
    "ProductNotFoundError",
    "FilterError",
    "AttributeFilterError",
    "ConflictError",
    "TrainingDataError",
    "QueryDataError",
    "VersionError",
    "IndexBusyError",
    "StorageError",
    "NothingIngestedError",
]


class VsearchError(Exception):
    """Base class of every error vsearch raises on purpose."""


class ConfigError(VsearchError):
    """A configuration value is invalid or inconsistent."""


class ModelError(VsearchError):
    """A model name cannot be resolved or its weights cannot be loaded."""


class ImageError(VsearchError):
    """An image cannot be read, decoded, or is too large."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class ImageTooLargeError(ImageError):
    """More pixels or bytes than allowed (e.g. a decompression bomb)."""


class UnsupportedImageError(ImageError):
    """The data is not an image in a format vsearch can read."""


class ManifestError(VsearchError):
    """A CSV/JSONL manifest is malformed; the message names the line."""


class IndexNotFoundError(VsearchError):
    """No index directory exists where one was expected."""


class IndexFormatError(VsearchError):
    """An index directory was written by an incompatible vsearch version or model."""


class ProductNotFoundError(VsearchError):
    """A product id is not in the catalog."""


class FilterError(VsearchError):
    """A category filter matches nothing or is malformed."""


class AttributeFilterError(FilterError):
    """An attribute filter or facet request is malformed (a bad operator, value or clause)."""


class ConflictError(VsearchError):
    """The thing to create exists already."""


class TrainingDataError(VsearchError):
    """The labelled photos cannot train a model (none usable, no known products)."""


class QueryDataError(VsearchError):
    """Too few shoppers' query photos have been collected to fit on."""


class VersionError(VsearchError):
    """A model version is missing, incomplete, or cannot be removed."""


class IndexBusyError(VsearchError):
    """Another process holds the index directory's write lock for too long."""


class StorageError(VsearchError):
    """The index directory cannot be written (disk full, read-only file system);
    nothing was changed."""


class NothingIngestedError(VsearchError):
    """Every item of an ingestion was rejected: nothing was stored."""

"""vsearch: visual similarity search for product catalogs.

Vectors everywhere in vsearch are float32 and L2-normalised, so inner product is
cosine similarity. Importing this package loads no model, index or database.
"""

from __future__ import annotations

from .config import IndexConfig, ModelConfig, ProjectionConfig
from .errors import VsearchError
from .version import __version__

__all__ = ["Engine", "IndexConfig", "ModelConfig", "ProjectionConfig", "VsearchError", "__version__"]


def __getattr__(name: str) -> object:
    # Engine pulls in torch and faiss; defer that cost until someone asks for it.
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(name)

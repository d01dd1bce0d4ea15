"""What runs on Ray's workers for ``vsearch ingest --ray`` (:mod:`vsearch.rayingest`):
the embedding actor (one model each, loaded once) and the decoding task of the GPU
pipeline. The in-process loader's read -> hash -> decode -> prepare runs here as is
(:func:`vsearch.embed.load_images` in-process), so a row comes back ``embedded`` (with
its vector), ``unchanged`` (its hash is the one it was sent with: not decoded) or
``error`` (the reason an in-process ingest would reject it for).

Kept apart and light: a worker imports this module and, lazily, the model code, not
the catalog and index code the driver needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .embed import Embedder, LoadedImage

__all__ = ["EMBEDDED", "FAILED", "UNCHANGED", "EmbedActor", "decode_batch"]

EMBEDDED, UNCHANGED, FAILED = "embedded", "unchanged", "error"


def decode_batch(batch: dict[str, np.ndarray], model: dict[str, Any]) -> dict[str, Any]:
    """Read, hash, decode and prepare a batch (a CPU task): ``tensor`` is the model's
    input, empty for rows that are unchanged or unreadable."""
    from .config import ModelConfig
    from .embed import Preprocess

    loaded = _load(batch, Preprocess(ModelConfig.from_dict(model)))
    out = _columns(loaded)
    out["tensor"] = [x.tensor.numpy() if x.tensor is not None else np.zeros((0, 0, 0), np.float32) for x in loaded]
    return out


class EmbedActor:
    """One model per actor, loaded once; embeds a batch (decoding it first, unless a
    decoding stage did)."""

    def __init__(self, spec: dict[str, Any], device: str, threads: int, decode: bool) -> None:
        import torch

        from .config import ModelConfig
        from .embed import Preprocess

        torch.set_num_threads(max(1, threads))
        self.embedder = _load_embedder(spec, device)
        self.preprocess = Preprocess(ModelConfig.from_dict(spec["model"]))  # as the in-process ingest prepares images
        self.decode = decode

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        if self.decode:
            loaded = _load(batch, self.preprocess)
            out = _columns(loaded)
            tensors = [x.tensor for x in loaded]
        else:
            out = {k: batch[k] for k in ("n", "sha256", "width", "height", "phash", "status", "error")}
            tensors = [  # a copy: the batch may be a read-only view of Ray's object store
                torch.from_numpy(np.array(t, dtype=np.float32)) if out["status"][i] == EMBEDDED else None
                for i, t in enumerate(batch["tensor"])
            ]
        todo = [i for i, status in enumerate(out["status"]) if status == EMBEDDED]
        vectors = np.zeros((len(out["n"]), self.embedder.dim), dtype=np.float32)
        if todo:
            stack = torch.stack([tensors[i] for i in todo])  # type: ignore[misc]
            vectors[todo] = self.embedder.embed_tensor(stack)
        out["vector"] = vectors
        return out


def _load_embedder(spec: dict[str, Any], device: str) -> Embedder:
    """The served version's embedder on this worker (``device``: "cuda" on the GPU Ray
    gave the actor, else "cpu")."""
    from .config import ModelConfig
    from .embed import Embedder

    if spec["folder"]:
        from .adapter import AdaptedEmbedder

        return AdaptedEmbedder(Path(spec["folder"]), device=device)
    return Embedder(ModelConfig.from_dict(spec["model"]), device=device)


def _load(batch: dict[str, np.ndarray], preprocess: Any) -> list[LoadedImage]:
    """The in-process loader's read -> hash -> decode -> prepare, on this worker."""
    from .embed import load_images

    work = [(int(n), str(s), str(k)) for n, s, k in zip(batch["n"], batch["source"], batch["known"])]
    return [x for part in load_images(work, preprocess, batch_size=max(1, len(work)), workers=0) for x in part]


def _columns(loaded: list[LoadedImage]) -> dict[str, Any]:
    from .variants import to_signed

    def status(x: LoadedImage) -> str:
        return FAILED if x.error or (x.tensor is None and not x.unchanged) else UNCHANGED if x.unchanged else EMBEDDED

    return {
        "n": np.array([int(x.key) for x in loaded], dtype=np.int64),  # type: ignore[call-overload]
        "sha256": np.array([x.sha256 for x in loaded], dtype=object),
        "width": np.array([x.width for x in loaded], dtype=np.int32),
        "height": np.array([x.height for x in loaded], dtype=np.int32),
        "phash": np.array([to_signed(x.phash) or 0 for x in loaded], dtype=np.int64),  # 0: none (no real pHash is 0)
        "status": np.array([status(x) for x in loaded], dtype=object),
        "error": np.array([x.error or ("unreadable" if status(x) == FAILED else "") for x in loaded], dtype=object),
    }

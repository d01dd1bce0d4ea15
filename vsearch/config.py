"""Configuration as data: small frozen dataclasses saved as JSON beside the
artefacts they describe.

Only data lives here, no knowledge of model families, so every module can import
it: turning a model name into a :class:`ModelConfig` (built-in presets in
``model_configs/*.json``, open_clip's defaults) is :mod:`vsearch.presets`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import ConfigError, TrainingDataError

__all__ = [
    "FinetuneConfig",
    "IndexConfig",
    "ModelConfig",
    "ProjectionConfig",
    "ServeConfig",
]

POOLINGS = ("mean", "gem")
RESIZE_MODES = ("pad", "crop", "squash")
RAW_VECTORS = ("float16", "float32")  # IndexConfig.raw_vectors


@dataclass(frozen=True)
class ModelConfig:
    """Which backbone, which layers, how they are pooled and how images are prepared.

    ``name`` is a built-in preset (``efficientnet-lite0``), ``MODEL:PRETRAINED`` for any
    open_clip model (``ViT-B-32:laion2b_s34b_b79k``), or ``MODEL:/path/to/checkpoint.pt``.
    """

    name: str
    family: str  # one of vsearch.families.family_names(): "timm-efficientnet-lite" | "open_clip"
    arch: str  # timm architecture or open_clip model name
    pretrained: str = ""  # open_clip pretrained tag or checkpoint path; "" for random weights
    layers: tuple[str, ...] = ("head",)
    pooling: str | tuple[str, ...] = "mean"  # one for all layers, or one per layer
    gem_p: float = 3.0
    image_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: str = "pad"
    query_tta: bool = True  # average the full image and a 0.8 centre crop for queries

    def __post_init__(self) -> None:
        for pooling in self.poolings:
            if pooling not in POOLINGS:
                raise ConfigError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        if not isinstance(self.pooling, str) and len(self.pooling) != len(self.layers):
            raise ConfigError(f"{len(self.layers)} layers need {len(self.layers)} poolings, got {len(self.pooling)}")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"resize must be one of {RESIZE_MODES}, not {self.resize!r}")
        if not self.layers:
            raise ConfigError("at least one layer is needed")
        if self.gem_p <= 0:
            raise ConfigError("gem_p must be positive")

    @property
    def poolings(self) -> tuple[str, ...]:
        """The pooling of each layer, in layer order."""
        if isinstance(self.pooling, str):
            return (self.pooling,) * len(self.layers)
        return tuple(self.pooling)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**_checked_fields(cls, data, "model config"))


@dataclass(frozen=True)
class ProjectionConfig:
    """Post-processing after pooling: centre on a fitted mean, then PCA.

    PCA needs more than ``2 * pca_dim`` vectors to fit; with fewer, the full
    dimension is kept (the manifest's ``dim`` says which happened).
    """

    center: bool = True
    pca_dim: int | None = 256  # None keeps the full dimension
    whiten: bool = False


@dataclass(frozen=True)
class IndexConfig:
    """How the FAISS index is built. ``factory`` None means chosen by catalog size.

    An IVF index's nprobe is tuned when it is built: the smallest whose recall@10 on
    a sample of its own vectors reaches ``tune_recall``; the index file keeps it.
    ``tune_recall`` None uses ``nprobe`` instead (and is the only case it is used).

    ``raw_vectors``: how the catalog stores each image's raw vectors (kept for refits,
    rebuilds, "more like this" and export; every read gives float32): "float16" (the
    default: half the bytes, 3.5 KB for the default model's 1752 numbers; no recall
    moved on the grocery protocols, ``scripts/bench_vector_dtype.py``) or "float32"
    (exact). It applies to vectors written from then on.
    """

    factory: str | None = None
    nprobe: int = 16
    tune_recall: float | None = 0.95
    raw_vectors: str = "float16"

    def __post_init__(self) -> None:
        if self.nprobe < 1 or (self.tune_recall is not None and not 0 < self.tune_recall <= 1):
            raise ConfigError("index nprobe must be >= 1 and tune_recall in (0, 1]")
        if self.raw_vectors not in RAW_VECTORS:
            raise ConfigError(f"raw_vectors must be one of {RAW_VECTORS}, not {self.raw_vectors!r}")


LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class FinetuneConfig:
    """How ``vsearch finetune`` trains (see :mod:`vsearch.finetune` for the recipe)."""

    # The held-out split picked epoch 4 of 5 on grocery protocols A and B and epoch 3 on
    # clothing, so a 5th epoch cost ~3 minutes for nothing (issue 11).
    epochs: int = 4
    train_from: str = "stage4"
    head_dim: int = 512
    zero_shot_weight: float = 0.5
    # Product level: the zero-shot share for catalog images of products without
    # training photos (vsearch.gallery; 0.7 measured best on grocery protocol B).
    untrained_weight: float = 0.7
    views: int = 2  # augmented views cached per photo
    # The augmentation's largest hue shift, a share of the colour circle (0.5 at most).
    # None: none for product labels (a colour can be what tells two products apart:
    # the orange and the yellow pepper; grocery protocol A measured +0.007 to +0.054
    # Recall@1 at every epoch without it, issue 11), 0.05 for category labels.
    hue_jitter: float | None = None
    feature_crop: float = 1.0  # smallest side of the random crop of cached activations per batch (1: no crop)
    catalog_repeat: int = 10  # product level: each catalog image joins the training samples this often
    batch_size: int = 64
    lr_backbone: float = 1e-4
    lr_head: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.05
    margin: float = 0.2  # additive cosine margin of the true proxy (CosFace); 0 = plain normalised softmax
    # "constant", or "cosine": both learning rates decay along a half cosine to 0 at
    # the last planned epoch, batch by batch (a function of the step: resumes exactly).
    lr_schedule: str = "constant"
    val_fraction: float = 0.1
    patience: int = 2  # epochs without a better validation Recall@1 before stopping
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.views < 1 or self.batch_size < 2 or self.catalog_repeat < 0:
            raise TrainingDataError("epochs and views must be >= 1, batch_size >= 2, catalog_repeat >= 0")
        if not 0 <= self.margin < 1:
            raise TrainingDataError("margin must be in [0, 1)")
        if self.hue_jitter is not None and not 0 <= self.hue_jitter <= 0.5:
            raise TrainingDataError("hue_jitter must be in [0, 0.5]")
        if not 0 < self.feature_crop <= 1:
            raise TrainingDataError("feature_crop must be in (0, 1]")
        if self.lr_schedule not in LR_SCHEDULES:
            raise TrainingDataError(f"lr_schedule must be one of {LR_SCHEDULES}, not {self.lr_schedule!r}")
        if not 0 <= self.val_fraction < 1:
            raise TrainingDataError("val_fraction must be in [0, 1)")
        if not 0 <= self.untrained_weight <= 1:
            raise TrainingDataError("untrained_weight must be in [0, 1]")

    def hue_for(self, level: str) -> float:
        """The hue jitter used for labels of ``level`` ("product" or "category")."""
        if self.hue_jitter is not None:
            return self.hue_jitter
        return 0.0 if level == "product" else 0.05


@dataclass(frozen=True)
class ServeConfig:
    """How ``vsearch serve`` behaves. Built by :func:`vsearch.settings.serve_config`
    from a JSON file and environment variables."""

    index_dir: str = "indexes/default"
    api_key: str | None = None  # required for writes; without one, writes are refused
    read_key: str | None = None  # if set, reads need it (or the write key)
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    batch_max: int | None = None  # None: 16 when the model runs on a GPU, 1 (off) on the CPU
    batch_wait_ms: float = 4.0
    queue_size: int | None = None  # searches waiting for the model, past which 429; None: from the CPUs or batch size
    decode_budget_mb: float = 512  # memory all image decodes together may hold (estimated from headers); past it, 503
    decode_wait_s: float = 1.0  # how long a decode waits for that memory before the 503
    url_fetch_max: int = 8  # image URL fetches at once (each may take url_timeout_s); past it, 503 at once
    allow_private_urls: bool = False  # let image_url reach loopback/private/link-local addresses
    allowed_url_networks: tuple[str, ...] = ()  # or only these networks, e.g. ("10.1.2.0/24",)
    url_timeout_s: float = 8.0  # the whole fetch of an image URL (connect, redirects, body), not each read
    thumbnail_px: int = 256
    web_dir: str | None = None  # default: the repository's web/ folder
    reload_interval_s: float = 2.0  # how often to look for a model switch made by another process; 0: never
    checkpoint_interval_s: float = 30.0  # how often the index file is saved in the background after writes; 0: at every 64th
    block_cache_mb: float = 256  # vectors kept for category-filtered search (exact search on Flat/small filters)
    # A uniform sample of the shoppers' query embeddings (raw vectors of image queries
    # only: never the images, URLs or who sent them; DIR/query_vectors.npz), and the
    # refit of the projection on it once this many queries were seen, again at each
    # doubling (vsearch.refit.refit_from_queries). 0 turns either off.
    query_reservoir: int = 2000
    refit_after_queries: int = 100  # centring on 25-100 photos already gave most of the gain (bench_day_one.py)

    def __post_init__(self) -> None:
        limits = (self.max_upload_bytes, self.max_pixels, self.queue_size or 1, self.batch_max or 1, self.url_fetch_max)
        if min(limits) <= 0 or self.decode_budget_mb <= 0:
            raise ConfigError("limits must be positive")
        if self.decode_wait_s < 0:
            raise ConfigError("decode_wait_s must not be negative")
        if self.query_reservoir < 0 or self.refit_after_queries < 0:
            raise ConfigError("query_reservoir and refit_after_queries must not be negative (0 turns them off)")
        if self.block_cache_mb < 0:
            raise ConfigError("block_cache_mb must not be negative (0 keeps no vectors between searches)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeConfig:
        return cls(**_checked_fields(cls, data, "serve config"))


def _checked_fields(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    """``data`` as keyword arguments for dataclass ``cls``: unknown keys refused, JSON lists as tuples."""
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ConfigError(f"unknown {what} keys: {sorted(unknown)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}

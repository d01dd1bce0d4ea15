"""Fine-tuned model versions: a frozen pretrained trunk, a retrained tail and head.

An adapted version keeps the base model's early stages frozen and retrains its
last stage(s) plus a linear projection head on the catalog's labelled photos
(:mod:`vsearch.finetune`). With ``w = zero_shot_weight`` its vector joins two
L2-normalised parts,

    sqrt(w) * zero-shot vector  ++  sqrt(1 - w) * adapted vector

so the cosine of two such vectors is ``w * zero-shot + (1 - w) * adapted``
similarity. The zero-shot part (the base model's layers, pooled and projected
exactly as the base index does) keeps products the training never saw as
findable as before; the adapted part learns the shop's domain (shelves, hands,
lighting). Both parts come from one forward pass through the shared trunk.

A version lives in ``DIR/models/NAME/``: ``adapter.json`` (this config),
``weights.pt`` (the retrained parameters only), ``base_projection.npz`` (the
base centring/PCA, frozen at training time), ``report.json`` and, for product-level
versions, ``trained_products.json`` (:mod:`vsearch.gallery`).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import ModelConfig
from .embed import Embedder, Preprocess, pick_device, pool
from .errors import ConfigError, ModelError
from .families import split_for_training
from .malloc import tune_malloc
from .projection import Projection

__all__ = ["AdapterConfig", "AdaptedNet", "AdaptedEmbedder", "ADAPTER_FILE", "WEIGHTS_FILE", "PROJECTION_FILE"]

ADAPTER_FILE = "adapter.json"
WEIGHTS_FILE = "weights.pt"
PROJECTION_FILE = "base_projection.npz"


@dataclass(frozen=True)
class AdapterConfig:
    """What a fine-tuned version is: which base model, where training starts, the head."""

    base: ModelConfig
    train_from: str = "stage4"  # first retrained stage ("head": only the final conv)
    head_dim: int = 512
    zero_shot_weight: float = 0.5  # share of the similarity left to the zero-shot part; 0 = adapted only
    # The zero-shot share for catalog images of products without training photos
    # (vsearch.gallery); None: every image uses zero_shot_weight (class-level
    # versions, and versions made before trained products were recorded).
    untrained_weight: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.zero_shot_weight < 1.0:
            raise ConfigError("zero_shot_weight must be in [0, 1)")
        if self.head_dim <= 0:
            raise ConfigError("head_dim must be positive")
        if self.untrained_weight is not None and (self.zero_shot_weight == 0 or not 0.0 <= self.untrained_weight <= 1.0):
            raise ConfigError("untrained_weight must be in [0, 1], and needs a zero-shot part (zero_shot_weight > 0)")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["base"] = self.base.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        data = dict(data)
        data["base"] = ModelConfig.from_dict(data["base"])
        return cls(**data)

    def save(self, folder: Path) -> None:
        (folder / ADAPTER_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> AdapterConfig:
        try:
            return cls.from_dict(json.loads((folder / ADAPTER_FILE).read_text()))
        except (OSError, json.JSONDecodeError, TypeError, KeyError) as exc:
            raise ModelError(f"{folder}: unreadable model version: {exc}") from exc


class AdaptedNet(torch.nn.Module):
    """The base backbone split at ``train_from``: a frozen trunk, the frozen original
    tail (for the zero-shot part) and a trainable copy of the tail plus a head.

    Works for any family that registers a split (:func:`vsearch.families.split_for_training`).
    """

    def __init__(self, config: AdapterConfig, base_projection: Projection) -> None:
        super().__init__()
        self.config = config
        split = split_for_training(config.base, config.train_from)
        self.stage_ends = split.stage_ends
        self.stage_names = split.stage_names
        self.head_name = split.head_name
        self.cut = len(split.trunk)
        # The order in which modules are registered fixes the state_dict keys and the
        # order of parameters: saved weights.pt files depend on it.
        self.stem = split.stem
        self.trunk = torch.nn.Sequential(*split.trunk)
        self.base_tail = torch.nn.ModuleList(split.tail)
        self.base_head = split.head
        self.tail = copy.deepcopy(torch.nn.Sequential(*split.tail))
        self.head = copy.deepcopy(self.base_head)
        self.proj = torch.nn.Linear(split.features, config.head_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            torch.nn.init.orthogonal_(self.proj.weight)
            torch.nn.init.zeros_(self.proj.bias)
        self.weight = config.zero_shot_weight
        mean, comps = base_projection.mean, base_projection.components
        self.proj_mean: torch.Tensor
        self.proj_components: torch.Tensor
        self.register_buffer("proj_mean", torch.from_numpy(mean) if mean is not None else torch.zeros(0))
        self.register_buffer("proj_components", torch.from_numpy(comps) if comps is not None else torch.zeros(0))
        for module in (self.stem, self.trunk, self.base_tail, self.base_head):
            module.requires_grad_(False)
        self.eval()  # BatchNorm keeps its ImageNet statistics, also while training

    def trainable(self) -> dict[str, torch.nn.Module]:
        return {"tail": self.tail, "head": self.head, "proj": self.proj}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v for name, m in self.trainable().items() for k, v in m.state_dict().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, module in self.trainable().items():
            prefix = name + "."
            module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})

    def encode_trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(trunk activations, zero-shot vectors): what training caches per image."""
        maps: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        for i, block in enumerate(self.trunk):
            x = block(x)
            if i in self.stage_ends:
                maps[self.stage_names[self.stage_ends.index(i)]] = x
        return x, self.zero_shot(x, maps) if self.weight > 0 else torch.zeros(len(x), 0)

    def zero_shot(self, x: torch.Tensor, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """The base model's projected vector, computed from the trunk's output."""
        for offset, block in enumerate(self.base_tail):
            x = block(x)
            if self.cut + offset in self.stage_ends:
                maps[self.stage_names[self.stage_ends.index(self.cut + offset)]] = x
        base = self.config.base
        if self.head_name in base.layers:
            maps[self.head_name] = self.base_head(x)
        parts = [F.normalize(pool(maps[name], how, base.gem_p), dim=1) for name, how in zip(base.layers, base.poolings)]
        raw = F.normalize(torch.cat(parts, dim=1), dim=1)
        if self.proj_mean.numel():
            raw = raw - self.proj_mean
        if self.proj_components.numel():
            raw = raw @ self.proj_components.T
        return F.normalize(raw, dim=1)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        """The retrained part's vector from trunk activations (differentiable)."""
        pooled = pool(self.head(self.tail(x)), "gem", self.config.base.gem_p)
        return F.normalize(self.proj(pooled), dim=1)

    def combine(self, zero_shot: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
        if self.weight == 0:
            return adapted
        return torch.cat([math.sqrt(self.weight) * zero_shot, math.sqrt(1 - self.weight) * adapted], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trunk, zero_shot = self.encode_trunk(x)
        return self.combine(zero_shot, self.adapted(trunk))


class AdaptedEmbedder(Embedder):
    """An :class:`Embedder` for a fine-tuned version directory."""

    def __init__(self, folder: Path, device: str | None = None) -> None:
        tune_malloc()
        adapter = AdapterConfig.load(folder)
        self.config = adapter.base
        self.device = pick_device(device)
        self.net = AdaptedNet(adapter, Projection.load(folder / PROJECTION_FILE))
        try:
            state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
            self.net.load_trainable_state(state)
        except (OSError, RuntimeError) as exc:
            raise ModelError(f"{folder}: cannot load weights: {exc}") from exc
        self.net.to(self.device)
        self.preprocess = Preprocess(adapter.base)
        self._dim = None

    @property
    def has_text(self) -> bool:
        return False

    def embed_tensor(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), self._autocast():
            vectors = self.net(batch.to(self.device, non_blocking=True)).float()
        return vectors.cpu().numpy().astype(np.float32, copy=False)

    def embed_regions(self, image: Image.Image, boxes: list[tuple[float, float, float, float]]) -> np.ndarray:
        raise ModelError("region search needs the base model; switch with: vsearch model use base")

    def embed_text(self, texts: list[str]) -> np.ndarray:
        raise ModelError("this model has no text tower")

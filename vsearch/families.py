"""The backbone families vsearch knows, and what each can do.

A family is a kind of backbone (``ModelConfig.family``). Its entry says how to
build one, which ``ModelConfig`` fields an ``ARCH:TAG`` model name implies,
whether text queries can be embedded next to a config's image vectors, and how
to take the backbone apart for fine-tuning. Code elsewhere asks these questions
here instead of comparing family names, so a new family is one
:func:`register_family` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .backbones import Backbone, EfficientNetLite, OpenClipImage, TrainSplit, open_clip_defaults, split_efficientnet
from .config import ModelConfig
from .errors import ModelError

__all__ = [
    "EFFICIENTNET_LITE",
    "OPEN_CLIP",
    "Family",
    "build_backbone",
    "can_finetune",
    "family_names",
    "get_family",
    "has_text",
    "register_family",
    "split_for_training",
]

EFFICIENTNET_LITE = "timm-efficientnet-lite"
OPEN_CLIP = "open_clip"


@dataclass(frozen=True)
class Family:
    """One family's capabilities; ``None`` means the family cannot do that."""

    name: str
    build: Callable[[ModelConfig], Backbone]
    # Whether text queries embed into the same space as this config's image vectors.
    text: Callable[[ModelConfig], bool]
    # ModelConfig fields (layers, resize, image_size, mean, std) for model ARCH with
    # weights TAG, from an ``ARCH:TAG`` name; None: only built-in presets name its models.
    defaults: Callable[[str, str], dict[str, Any]] | None = None
    # (backbone, train_from) -> the backbone taken apart for fine-tuning.
    split: Callable[[Any, str], TrainSplit] | None = None


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family, *, replace: bool = False) -> None:
    if family.name in _FAMILIES and not replace:
        raise ModelError(f"model family {family.name!r} is registered already")
    _FAMILIES[family.name] = family


def family_names() -> list[str]:
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise ModelError(f"unknown model family {name!r}")
    return _FAMILIES[name]


def build_backbone(config: ModelConfig) -> Backbone:
    """The backbone of ``config``, checked to have every layer ``config`` asks for."""
    backbone = get_family(config.family).build(config)
    unknown = [name for name in config.layers if name not in backbone.layer_names]
    if unknown:
        raise ModelError(f"{config.name} has no layer(s) {unknown}; available: {', '.join(backbone.layer_names)}")
    return backbone


def has_text(config: ModelConfig) -> bool:
    """Whether text queries can search an index of ``config``'s vectors; loads no model.

    A family vsearch does not know cannot embed anything, so it has no text either.
    """
    family = _FAMILIES.get(config.family)
    return family is not None and family.text(config)


def can_finetune(config: ModelConfig) -> bool:
    return get_family(config.family).split is not None


def split_for_training(config: ModelConfig, train_from: str) -> TrainSplit:
    """Build ``config``'s backbone and take it apart before layer ``train_from``.

    Families without a split are refused before anything is loaded.
    """
    split = get_family(config.family).split
    if split is None:
        able = ", ".join(name for name in family_names() if _FAMILIES[name].split is not None)
        raise ModelError(f"fine-tuning supports {able} models, not {config.family!r} ({config.name})")
    return split(build_backbone(config), train_from)


def _built(cls: Callable[[ModelConfig], Any]) -> Callable[[ModelConfig], Backbone]:
    # The classes satisfy the Backbone protocol structurally; mypy cannot see it
    # through torch.nn.Module's __call__, hence the cast through Any.
    def build(config: ModelConfig) -> Backbone:
        backbone: Any = cls(config)
        return backbone  # type: ignore[no-any-return]

    return build


register_family(
    Family(
        name=EFFICIENTNET_LITE,
        build=_built(EfficientNetLite),
        text=lambda config: False,  # an ImageNet classifier has no text tower
        split=split_efficientnet,
    )
)
register_family(
    Family(
        name=OPEN_CLIP,
        build=_built(OpenClipImage),
        # Text embeddings share a space with the image embedding only: a vector that
        # also holds (or is) intermediate block features is not comparable to them.
        text=lambda config: config.layers == ("embed",),
        defaults=open_clip_defaults,
    )
)

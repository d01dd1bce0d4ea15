"""Model names as users write them, turned into full :class:`ModelConfig` s.

A name is a built-in preset (``model_configs/NAME.json``), a saved config
(``path/to/config.json``), or ``ARCH:TAG`` for a family that takes such names
(open_clip: ``ViT-B-32:laion2b_s34b_b79k``, ``ARCH:/path/to/checkpoint.pt``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import ConfigError
from .families import OPEN_CLIP, get_family

__all__ = ["preset", "preset_names", "resolve_model"]

# The family an ``ARCH:TAG`` name selects: the only one whose models are named that way.
TAGGED_FAMILY = OPEN_CLIP


def preset_names() -> list[str]:
    files = resources.files("vsearch").joinpath("model_configs").iterdir()
    return sorted(p.name.removesuffix(".json") for p in files if p.name.endswith(".json"))


def preset(name: str) -> ModelConfig:
    path = resources.files("vsearch").joinpath("model_configs").joinpath(f"{name}.json")
    if not path.is_file():
        raise ConfigError(f"unknown model {name!r}; built-in models: {', '.join(preset_names())}")
    data = json.loads(path.read_text())
    return ModelConfig.from_dict({"name": name, **data})


def resolve_model(name: str, **overrides: Any) -> ModelConfig:
    """Turn a model name from the user into a full config.

    ``MODEL:PRETRAINED`` selects an open_clip model, a ``.json`` path a saved config;
    anything else must be a preset.
    """
    if name.endswith(".json"):
        try:
            config = ModelConfig.from_dict(json.loads(Path(name).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"cannot read model config {name}: {exc}") from exc
    elif ":" in name and name.split(":", 1)[0] not in preset_names():
        config = _tagged(name)
    else:
        config = preset(name)
    clean = {k: v for k, v in overrides.items() if v is not None}
    for key in ("layers", "pooling"):
        if isinstance(clean.get(key), list):
            clean[key] = tuple(clean[key])
    if "layers" in clean and "pooling" not in clean and not isinstance(config.pooling, str):
        clean["pooling"] = config.pooling[-1]  # per-layer poolings no longer line up
    if "pooling" in clean and isinstance(clean["pooling"], tuple) and len(clean["pooling"]) == 1:
        clean["pooling"] = clean["pooling"][0]
    return replace(config, **clean) if clean else config


def _tagged(name: str) -> ModelConfig:
    arch, pretrained = name.split(":", 1)
    defaults = get_family(TAGGED_FAMILY).defaults
    if defaults is None:
        raise ConfigError(f"model family {TAGGED_FAMILY!r} does not take ARCH:TAG names")
    return ModelConfig(name=name, family=TAGGED_FAMILY, arch=arch, pretrained=pretrained, **defaults(arch, pretrained))

"""Environment variables, read here and nowhere else."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ServeConfig
from .errors import ConfigError

__all__ = ["Settings", "settings", "serve_config"]


@dataclass(frozen=True)
class Settings:
    index_dir: str  # VSEARCH_INDEX: default index directory
    demo_data: str | None  # VSEARCH_DEMO_DATA: local folder for `vsearch demo`
    device: str | None  # VSEARCH_DEVICE: cpu, cuda, mps (default: best available)
    model: str | None  # VSEARCH_MODEL: model for new indexes
    malloc_tuning: bool  # VSEARCH_MALLOC_TUNING=0 keeps glibc's allocator defaults


def settings() -> Settings:
    env = os.environ
    return Settings(
        index_dir=env.get("VSEARCH_INDEX", "indexes/default"),
        demo_data=env.get("VSEARCH_DEMO_DATA") or None,
        device=env.get("VSEARCH_DEVICE") or None,
        model=env.get("VSEARCH_MODEL") or None,
        malloc_tuning=env.get("VSEARCH_MALLOC_TUNING", "1") != "0",
    )


def serve_config(config_file: str | None = None, **overrides: Any) -> ServeConfig:
    """Serving configuration: defaults < JSON file (``--config`` or VSEARCH_CONFIG)
    < environment (VSEARCH_API_KEY, VSEARCH_READ_KEY, VSEARCH_INDEX) < ``overrides``."""
    env = os.environ
    data: dict[str, Any] = {}
    path = config_file or env.get("VSEARCH_CONFIG")
    if path:
        try:
            data.update(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read serve config {path}: {exc}") from exc
    for key, name in (("api_key", "VSEARCH_API_KEY"), ("read_key", "VSEARCH_READ_KEY"), ("index_dir", "VSEARCH_INDEX")):
        if env.get(name):
            data[key] = env[name]
    data.update({k: v for k, v in overrides.items() if v is not None})
    return ServeConfig.from_dict(data)

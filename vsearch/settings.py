"""Environment variables, read here and nowhere else."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Settings", "settings"]


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

"""Model versions of an index directory: ``base`` (the model the index was built
with) and fine-tuned versions under ``DIR/models/NAME/``.

A version directory is written under a temporary name and renamed into place,
so it is either complete or absent. Which version serves is the manifest's
``active_model``; see :meth:`vsearch.engine.Engine.use_model`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapter import ADAPTER_FILE
from .catalog import BASE_MODEL
from .errors import VersionError
from .fsutil import _fsync_dir

__all__ = ["BASE_MODEL", "VersionInfo", "list_versions", "next_version_name", "version_dir", "write_version", "check_name"]

REPORT_FILE = "report.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class VersionInfo:
    name: str
    active: bool
    created_at: float | None
    summary: dict[str, Any]  # from the training report: best epoch, validation Recall@1, ...

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "active": self.active, "created_at": self.created_at, **self.summary}


def models_dir(root: Path) -> Path:
    return root / "models"


def check_name(name: str) -> str:
    if not _NAME.match(name) or name == BASE_MODEL:
        raise VersionError(f"bad version name {name!r}: letters, digits, '.', '_' or '-', not {BASE_MODEL!r}")
    return name


def version_dir(root: Path, name: str) -> Path:
    """The folder of fine-tuned version ``name``; it must exist and be complete."""
    folder = models_dir(root) / check_name(name)
    if not (folder / ADAPTER_FILE).is_file():
        known = ", ".join(v.name for v in list_versions(root, ""))
        raise VersionError(f"no model version {name!r} in {root} (versions: {known})")
    return folder


def list_versions(root: Path, active: str) -> list[VersionInfo]:
    out = [VersionInfo(BASE_MODEL, active == BASE_MODEL, None, {"kind": "pretrained"})]
    folder = models_dir(root)
    if not folder.is_dir():
        return out
    for entry in sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime):
        if entry.name.startswith(".") or not (entry / ADAPTER_FILE).is_file():
            continue
        summary: dict[str, Any] = {"kind": "fine-tuned"}
        try:
            report = json.loads((entry / REPORT_FILE).read_text())
            summary.update({k: report.get(k) for k in ("best_epoch", "val_recall_at_1", "val_recall_at_10", "seconds")})
            summary["trained_on"] = report.get("data", {}).get("train_photos")
        except (OSError, json.JSONDecodeError):
            pass
        out.append(VersionInfo(entry.name, entry.name == active, (entry / ADAPTER_FILE).stat().st_mtime, summary))
    return out


def next_version_name(root: Path) -> str:
    folder = models_dir(root)
    taken = {p.name.lstrip(".").removeprefix("partial-") for p in folder.glob("*")} if folder.exists() else set()
    n = 1
    while f"ft-{n:03d}" in taken:
        n += 1
    return f"ft-{n:03d}"


def write_version(root: Path, name: str, write: Callable[[Path], None]) -> Path:
    """Create version ``name``: ``write(tmp_folder)`` fills a temporary folder, which
    then becomes ``DIR/models/NAME`` in one rename."""
    final = models_dir(root) / check_name(name)
    if final.exists():
        raise VersionError(f"model version {name!r} exists already in {root}")
    tmp = models_dir(root) / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for path in tmp.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def remove_version_dir(root: Path, name: str) -> None:
    shutil.rmtree(version_dir(root, name))

"""Fine-tuning on labelled shopper photos: ``(photo, product_id)`` pairs -> a new
model version of the index (see :mod:`vsearch.adapter` for what is trained).

Recipe (chosen by measurement on the grocery benchmark; see README):

* the trunk up to ``train_from`` stays frozen, so its activations are computed
  once per augmented view and cached (random resized crop 0.4-1, flip, colour
  jitter, +-10 degree rotation; no hue shift for product labels: +0.7 to +5.4
  points of Recall@1 per epoch on grocery protocol A); training then runs only the
  tail, which is what makes a CPU run take minutes rather than hours;
* normalised-softmax loss with a cosine margin (CosFace, ``margin`` 0.2: +4 points
  of Recall@1 on grocery protocol A) against one learnable proxy per product,
  initialised from the product's catalog images; the catalog images are also training
  samples (``catalog_repeat`` times), tying photos to what the gallery shows;
* the loss scores the same blended similarity that search uses (zero-shot part
  fixed), so training learns what the zero-shot part gets wrong;
* a seeded validation split of the photos, early stopping on its Recall@1, and a
  checkpoint after every epoch: an interrupted run resumes where it stopped.

The steps live in :mod:`vsearch.training_data` (checking and splitting the pairs),
:mod:`vsearch.training_cache` (the trunk activations) and :mod:`vsearch.training`
(the loop); this module runs them and saves the version.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .adapter import PROJECTION_FILE, WEIGHTS_FILE, AdaptedNet, AdapterConfig
from .config import FinetuneConfig
from .embed import pick_device
from .errors import VersionError
from .fsutil import atomic_write_bytes
from .gallery import save_trained
from .projection import Projection
from .sources import Item, read_pairs
from .training import Trainer
from .training_cache import load_or_build_cache
from .training_data import TrainingData, prepare
from .versions import REPORT_FILE, check_name, models_dir, next_version_name, write_version

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["FinetuneConfig", "FinetuneReport", "finetune"]


@dataclass
class FinetuneReport:
    name: str
    config: dict[str, Any]
    data: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    level: str = "product"  # what the labels name: "product" or "category"
    val_recall_at_1: float | None = None  # product level
    val_recall_at_10: float | None = None
    val_precision_at_10: float | None = None  # category level
    cache_seconds: float = 0.0
    seconds: float = 0.0
    device: str = "cpu"
    resumed_from_epoch: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def finetune(
    engine: Engine,
    pairs: str | Path | Sequence[Item],
    *,
    name: str | None = None,
    config: FinetuneConfig | None = None,
    quiet: bool = False,
    log: Callable[[str], None] | None = None,
) -> FinetuneReport:
    """Train a model version of ``engine``'s index on ``pairs`` and save it as
    ``DIR/models/NAME``.

    ``pairs``: a CSV/JSONL of ``image,product_id`` (products of the index), or of
    ``image,category`` without product ids (class level: the model learns what
    makes a category, for "more dresses like this"); or items (class level when
    none has a product id).

    The version is not served until :meth:`Engine.use_model` (``vsearch reindex``).
    """
    config = config or FinetuneConfig()
    say = log or (lambda msg: print(msg, file=sys.stderr))
    items = read_pairs(pairs) if isinstance(pairs, (str, Path)) else list(pairs)
    started = time.perf_counter()
    _seed(config.seed)
    root = engine.paths.root
    if name is not None and (models_dir(root) / check_name(name)).exists():
        raise VersionError(f"model version {name!r} exists already; choose another --name or remove it")
    device = pick_device(engine.device)
    base_projection = Projection.load(engine.paths.projection)
    adapter = AdapterConfig(
        base=engine.manifest.model,
        train_from=config.train_from,
        head_dim=config.head_dim,
        zero_shot_weight=config.zero_shot_weight,
    )
    net = AdaptedNet(adapter, base_projection).to(device)  # checks the model and train_from before the slow part
    data = prepare(engine, items, config)
    if data.level == "product" and config.zero_shot_weight > 0:
        adapter = replace(adapter, untrained_weight=config.untrained_weight)
    for warning in data.warnings:
        say(f"warning: {warning}")
    name, work = _work_dir(root, name, _plan_key(engine, data, config))
    report = FinetuneReport(
        name=name, config=asdict(config), data=data.stats, warnings=data.warnings, device=device.type, level=data.level
    )

    cache_start = time.perf_counter()
    cache = load_or_build_cache(work, net, data, config, device, quiet)
    report.cache_seconds = round(time.perf_counter() - cache_start, 1)
    _train(Trainer(net, cache, data, config, device), report, work / "checkpoint.pt", quiet, say)
    report.seconds = round(time.perf_counter() - started, 1)

    def write(folder: Path) -> None:
        adapter.save(folder)
        if adapter.untrained_weight is not None:  # the products the adapted part has seen photos of
            save_trained(folder, [label for _, label in data.train])
        torch.save(net.trainable_state(), folder / WEIGHTS_FILE)
        base_projection.save(folder / PROJECTION_FILE)
        (folder / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")

    write_version(root, name, write)
    shutil.rmtree(work, ignore_errors=True)
    return report


def _train(trainer: Trainer, report: FinetuneReport, checkpoint: Path, quiet: bool, say: Callable[[str], None]) -> None:
    """Run (or resume) the epochs, checkpointing after each; leave the best epoch's
    weights in the net and its numbers in ``report``."""
    epochs = trainer.config.epochs
    if checkpoint.exists():
        report.resumed_from_epoch = trainer.restore(checkpoint)
        report.epochs = list(trainer.history)
        say(f"resuming {report.name} after epoch {report.resumed_from_epoch}")
    if trainer.epoch == 0:
        metrics = trainer.validate()
        if metrics:  # the curve starts from the untrained head
            trainer.history.append({"epoch": 0, **{k: round(v, 4) for k, v in metrics.items()}})
            report.epochs = list(trainer.history)
        say(f"epoch 0 (untrained head): {_metrics(metrics or {}, trainer.level)}")
    while trainer.epoch < epochs and not trainer.should_stop():
        row = trainer.run_epoch(quiet)
        report.epochs.append(row)
        trainer.save(checkpoint)
        scores = _metrics(row, trainer.level)
        say(f"epoch {int(row['epoch'])}/{epochs}: loss {row['loss']:.4f}  {scores}  ({row['seconds']:.0f} s)")
    trainer.restore_best()
    report.best_epoch = trainer.best_epoch
    best = trainer.best_metrics
    report.val_recall_at_1, report.val_recall_at_10 = best.get("val_recall_at_1"), best.get("val_recall_at_10")
    report.val_precision_at_10 = best.get("val_precision_at_10")


def _metrics(row: dict[str, float], level: str) -> str:
    def fmt(key: str) -> str:
        return "-" if row.get(key) is None else f"{row[key]:.3f}"

    if level == "category":
        return f"val category P@10 {fmt('val_precision_at_10')}"
    return f"val R@1 {fmt('val_recall_at_1')}  R@10 {fmt('val_recall_at_10')}  MRR {fmt('val_mrr')}"


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# resuming -----------------------------------------------------------------------
def _plan_key(engine: Engine, data: TrainingData, config: FinetuneConfig) -> str:
    """What a resumed run must agree on: data, settings and base model."""
    digest = hashlib.sha256()
    settings = asdict(config)
    if settings["lr_schedule"] == "constant":  # added later: a run interrupted before it still resumes
        del settings["lr_schedule"]
    # hue_jitter stays in: its default changed what a product-level run caches, so a
    # run interrupted before it existed must not resume with the old views.
    key = [settings, engine.manifest.model.to_dict(), data.level, data.train, data.val]
    digest.update(json.dumps(key).encode())
    digest.update(b"".join(hashlib.sha256(b).digest() for b, _ in data.gallery))
    return digest.hexdigest()[:16]


def _work_dir(root: Path, name: str | None, plan: str) -> tuple[str, Path]:
    """The partial-run folder: the one for the same plan if any (resume), else new."""
    base = models_dir(root)
    if name is None:
        for folder in sorted(base.glob(".partial-*")) if base.exists() else []:
            if _same_plan(folder, plan):
                return folder.name.removeprefix(".partial-"), folder
        name = next_version_name(root)
    work = base / f".partial-{name}"
    if work.exists() and not _same_plan(work, plan):
        shutil.rmtree(work)  # an interrupted run with other data or settings
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(work / "plan", plan.encode())
    return name, work


def _same_plan(work: Path, plan: str) -> bool:
    return (work / "plan").is_file() and (work / "plan").read_text() == plan

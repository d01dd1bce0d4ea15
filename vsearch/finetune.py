"""Fine-tuning on labelled shopper photos: ``(photo, product_id)`` pairs -> a new
model version of the index (see :mod:`vsearch.adapter` for what is trained).

Recipe (chosen by measurement on the grocery benchmark; see README):

* the trunk up to ``train_from`` stays frozen, so its activations are computed
  once per augmented view and cached (random resized crop 0.4-1, flip, colour
  jitter, +-10 degree rotation); training then runs only the tail, which is what
  makes a CPU run take minutes rather than hours;
* normalised-softmax loss against one learnable proxy per product, initialised
  from the product's catalog images; the catalog images are also training
  samples (``catalog_repeat`` times), tying photos to what the gallery shows;
* the loss scores the same blended similarity that search uses (zero-shot part
  fixed), so training learns what the zero-shot part gets wrong;
* a seeded validation split of the photos, early stopping on its Recall@1, and a
  checkpoint after every epoch: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .adapter import PROJECTION_FILE, WEIGHTS_FILE, AdaptedNet, AdapterConfig
from .config import FinetuneConfig
from .embed import Preprocess, center_crop, pick_device
from .errors import ImageError, TrainingDataError, VersionError
from .fsutil import atomic_write, atomic_write_bytes
from .images import decode_image, read_source
from .projection import Projection
from .sources import Item, read_source_items
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
    val_recall_at_1: float | None = None
    val_recall_at_10: float | None = None
    cache_seconds: float = 0.0
    seconds: float = 0.0
    device: str = "cpu"
    resumed_from_epoch: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Data:
    train: list[tuple[str, str]]  # (image source, product id)
    val: list[tuple[str, str]]
    gallery: list[tuple[bytes, str]]  # catalog images: (bytes, product id)
    products: list[str]
    stats: dict[str, Any]
    warnings: list[str]


def finetune(
    engine: Engine,
    pairs: str | Path | Sequence[Item],
    *,
    name: str | None = None,
    config: FinetuneConfig | None = None,
    quiet: bool = False,
    log: Callable[[str], None] | None = None,
) -> FinetuneReport:
    """Train a model version of ``engine``'s index on ``pairs`` (CSV/JSONL with
    ``image,product_id``, or items) and save it as ``DIR/models/NAME``.

    The version is not served until :meth:`Engine.use_model` (``vsearch reindex``).
    """
    config = config or FinetuneConfig()
    say = log or (lambda msg: print(msg, file=sys.stderr))
    items = read_source_items(pairs) if isinstance(pairs, (str, Path)) else list(pairs)
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
    data = _prepare(engine, items, config)
    for warning in data.warnings:
        say(f"warning: {warning}")
    plan = _plan_key(engine, data, config)
    name, work = _work_dir(root, name, plan)
    report = FinetuneReport(name=name, config=asdict(config), data=data.stats, warnings=data.warnings, device=device.type)

    cache_start = time.perf_counter()
    cache = _load_or_build_cache(work, net, data, config, device, quiet)
    report.cache_seconds = round(time.perf_counter() - cache_start, 1)
    trainer = _Trainer(net, cache, data, config, device)
    checkpoint = work / "checkpoint.pt"
    if checkpoint.exists():
        report.resumed_from_epoch = trainer.restore(checkpoint)
        report.epochs = list(trainer.history)
        say(f"resuming {name} after epoch {report.resumed_from_epoch}")
    if trainer.epoch == 0:
        r1, r10 = trainer.validate()
        if r1 is not None and r10 is not None:  # the curve starts from the untrained head
            trainer.history.append({"epoch": 0, "val_recall_at_1": round(r1, 4), "val_recall_at_10": round(r10, 4)})
            report.epochs = list(trainer.history)
        say(f"epoch 0 (untrained head): val R@1 {_fmt(r1)} R@10 {_fmt(r10)}")
    while trainer.epoch < config.epochs and not trainer.should_stop():
        row = trainer.run_epoch(quiet)
        report.epochs.append(row)
        trainer.save(checkpoint)
        say(
            f"epoch {int(row['epoch'])}/{config.epochs}: loss {row['loss']:.4f}  val R@1 {_fmt(row.get('val_recall_at_1'))}"
            f"  R@10 {_fmt(row.get('val_recall_at_10'))}  ({row['seconds']:.0f} s)"
        )
    trainer.restore_best()
    report.best_epoch = trainer.best_epoch
    report.val_recall_at_1, report.val_recall_at_10 = trainer.best_recall
    report.seconds = round(time.perf_counter() - started, 1)

    def write(folder: Path) -> None:
        adapter.save(folder)
        torch.save(net.trainable_state(), folder / WEIGHTS_FILE)
        base_projection.save(folder / PROJECTION_FILE)
        (folder / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")

    write_version(root, name, write)
    shutil.rmtree(work, ignore_errors=True)
    return report


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# data ---------------------------------------------------------------------------
def _prepare(engine: Engine, items: list[Item], config: FinetuneConfig) -> _Data:
    """Check the pairs against the catalog, split photos into train/validation."""
    known = engine.catalog.product_ids()
    warnings: list[str] = []
    unknown = [it for it in items if it.product_id not in known]
    if unknown:
        sample = ", ".join(sorted({it.product_id for it in unknown})[:5])
        warnings.append(f"{len(unknown)} of {len(items)} pairs name products not in the catalog (e.g. {sample}); skipped")
    pairs = sorted({(it.image, it.product_id) for it in items if it.product_id in known})
    readable, unreadable = [], 0
    for source, pid in pairs:  # decoded as training will decode them, so caching cannot fail later
        try:
            _load(source)
            readable.append((source, pid))
        except ImageError:
            unreadable += 1
    if unreadable:
        warnings.append(f"{unreadable} photos could not be read; skipped")
    if not readable:
        hint = f" (the index's product ids look like: {', '.join(sorted(known)[:3])})" if known and unknown else ""
        raise TrainingDataError(
            f"no usable pairs: {len(items)} given, {len(unknown)} unknown products, {unreadable} unreadable{hint}"
        )
    by_product: dict[str, list[str]] = {}
    for source, pid in readable:
        by_product.setdefault(pid, []).append(source)
    products = sorted(by_product)
    gallery = []
    for pid in products:
        for row in engine.catalog.images_of(pid):
            try:
                gallery.append((engine.image_bytes(row), pid))
            except ImageError:
                continue
    if len(products) < 2:
        raise TrainingDataError(f"photos of at least 2 products are needed to learn to tell them apart, got {len(products)}")
    single = sum(1 for v in by_product.values() if len(v) < 2)
    if single:
        warnings.append(f"{single} products have a single photo: they train but cannot be validated")
    without_gallery = len(set(products) - {pid for _, pid in gallery})
    if without_gallery:
        warnings.append(f"{without_gallery} products have no readable catalog image; their photos train only their proxy")

    rng = random.Random(config.seed)  # noqa: S311 - a reproducible split, not a secret
    order = list(readable)
    rng.shuffle(order)
    want_val = round(config.val_fraction * len(order))
    left = {pid: len(v) for pid, v in by_product.items()}
    train: list[tuple[str, str]] = []
    val: list[tuple[str, str]] = []
    for source, pid in order:
        if len(val) < want_val and left[pid] > 1:
            val.append((source, pid))
            left[pid] -= 1
        else:
            train.append((source, pid))
    stats = {
        "pairs": len(items),
        "unknown_product_pairs": len(unknown),
        "unreadable_photos": unreadable,
        "products": len(products),
        "train_photos": len(train),
        "val_photos": len(val),
        "catalog_images": len(gallery),
        "single_photo_products": single,
    }
    return _Data(sorted(train), sorted(val), gallery, products, stats, warnings)


def _plan_key(engine: Engine, data: _Data, config: FinetuneConfig) -> str:
    """What a resumed run must agree on: data, settings and base model."""
    digest = hashlib.sha256()
    digest.update(json.dumps([asdict(config), engine.manifest.model.to_dict(), data.train, data.val]).encode())
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


# cache --------------------------------------------------------------------------
def _augment(size: int) -> Callable[[Image.Image], Image.Image]:
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.4, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.3, 0.3, 0.3, 0.05),
            T.RandomRotation(10),
        ]
    )


def _load(source: str | bytes) -> Image.Image:
    if isinstance(source, bytes):
        return decode_image(source, "<catalog image>")
    return decode_image(read_source(source), source)


def _encode(
    net: AdaptedNet,
    images: Sequence[tuple[str | bytes, Callable[[Image.Image], torch.Tensor]]],
    device: torch.device,
    bar: tqdm,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trunk activations (fp16) and zero-shot vectors for images, 32 at a time."""
    if not images:  # e.g. no validation photos: empty tensors of the right shapes
        size = net.config.base.image_size
        with torch.inference_mode():
            trunk, zero = net.encode_trunk(torch.zeros(1, 3, size, size, device=device))
        return trunk[:0].half().cpu(), zero[:0].float().cpu()
    trunks, zeros = [], []
    for start in range(0, len(images), 32):
        batch = torch.stack([prep(_load(src)) for src, prep in images[start : start + 32]]).to(device)
        with torch.inference_mode():
            trunk, zero = net.encode_trunk(batch)
        trunks.append(trunk.half().cpu())
        zeros.append(zero.float().cpu())
        bar.update(len(batch))
    return torch.cat(trunks), torch.cat(zeros)


def _load_or_build_cache(
    work: Path, net: AdaptedNet, data: _Data, config: FinetuneConfig, device: torch.device, quiet: bool
) -> dict[str, torch.Tensor]:
    path = work / "cache.pt"
    if path.exists():
        cache: dict[str, torch.Tensor] = torch.load(path, weights_only=True)
        return cache
    base = net.config.base
    preprocess = Preprocess(base)
    augment = _augment(base.image_size)
    mean = torch.tensor(base.mean).view(3, 1, 1)
    std = torch.tensor(base.std).view(3, 1, 1)

    def augmented(image: Image.Image) -> torch.Tensor:
        array = np.array(augment(image), dtype=np.float32)
        return (torch.from_numpy(array).permute(2, 0, 1) / 255.0 - mean) / std

    def cropped(image: Image.Image) -> torch.Tensor:
        return preprocess(center_crop(image, 0.8))

    index = {pid: i for i, pid in enumerate(data.products)}
    samples: list[tuple[str | bytes, str]] = list(data.train) + [g for g in data.gallery for _ in range(config.catalog_repeat)]
    jobs = [(src, augmented) for _ in range(config.views) for src, _ in samples]
    labels = [index[pid] for _ in range(config.views) for _, pid in samples]
    total = len(jobs) + 2 * len(data.val) + len(data.gallery)
    gen = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(gen.get_state())  # torchvision draws its augmentations from torch's RNG
        with tqdm(total=total, unit="img", desc="caching", disable=quiet or not sys.stderr.isatty()) as bar:
            train_x, train_z = _encode(net, jobs, device, bar)
            val_x, val_z = _encode(net, [(s, preprocess) for s, _ in data.val], device, bar)
            crop_x, crop_z = _encode(net, [(s, cropped) for s, _ in data.val], device, bar)
            gal_x, gal_z = _encode(net, [(b, preprocess) for b, _ in data.gallery], device, bar)
    cache = {
        "train_x": train_x,
        "train_z": train_z,
        "train_y": torch.tensor(labels, dtype=torch.long),
        "val_x": val_x,
        "val_z": val_z,
        "crop_x": crop_x,
        "crop_z": crop_z,
        "val_y": torch.tensor([index[pid] for _, pid in data.val], dtype=torch.long),
        "gal_x": gal_x,
        "gal_z": gal_z,
        "gal_y": torch.tensor([index[pid] for _, pid in data.gallery], dtype=torch.long),
    }
    atomic_write(path, lambda tmp: torch.save(cache, tmp))
    return cache


# training -----------------------------------------------------------------------
class _Trainer:
    def __init__(
        self, net: AdaptedNet, cache: dict[str, torch.Tensor], data: _Data, config: FinetuneConfig, device: torch.device
    ) -> None:
        self.net, self.cache, self.config, self.device = net, cache, config, device
        self.n_products = len(data.products)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.zero_proxies = _class_means(
            cache["gal_z"], cache["gal_y"], self.n_products, fallback=(cache["train_z"], cache["train_y"])
        )
        with torch.no_grad():
            init = _class_means(self._adapted(cache["gal_x"]), cache["gal_y"], self.n_products)
        missing = init.norm(dim=1) == 0
        init[missing] = F.normalize(torch.randn(int(missing.sum()), init.shape[1], generator=self.generator), dim=1)
        self.proxies = torch.nn.Parameter(init.to(device))
        trained = net.trainable()
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [*trained["tail"].parameters(), *trained["head"].parameters()], "lr": config.lr_backbone},
                {"params": [*trained["proj"].parameters(), self.proxies], "lr": config.lr_head},
            ],
            weight_decay=config.weight_decay,
        )
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.best_epoch = 0
        self.best_recall: tuple[float | None, float | None] = (None, None)
        self.best_state: dict[str, torch.Tensor] | None = None

    def _adapted(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.net.adapted(x[i : i + 256].to(self.device).float()) for i in range(0, len(x), 256)]
        return torch.cat(outs) if outs else torch.zeros(0, self.config.head_dim, device=self.device)

    def _proxy_matrix(self) -> torch.Tensor:
        return self.net.combine(self.zero_proxies.to(self.device), F.normalize(self.proxies, dim=1))

    def run_epoch(self, quiet: bool) -> dict[str, float]:
        started = time.perf_counter()
        x, z, y = self.cache["train_x"], self.cache["train_z"], self.cache["train_y"]
        order = torch.randperm(len(x), generator=self.generator)
        total, seen = 0.0, 0
        bar = tqdm(
            range(0, len(order), self.config.batch_size),
            desc=f"epoch {self.epoch + 1}",
            unit="batch",
            disable=quiet or not sys.stderr.isatty(),
        )
        for start in bar:
            idx = order[start : start + self.config.batch_size]
            out = self.net.combine(z[idx].to(self.device), self.net.adapted(x[idx].to(self.device).float()))
            logits = out @ self._proxy_matrix().T / self.config.temperature
            loss = F.cross_entropy(logits, y[idx].to(self.device))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        self.epoch += 1
        r1, r10 = self.validate()
        row: dict[str, float] = {"epoch": self.epoch, "loss": round(total / max(seen, 1), 5)}
        if r1 is not None and r10 is not None:
            row.update(val_recall_at_1=round(r1, 4), val_recall_at_10=round(r10, 4))
        row["seconds"] = round(time.perf_counter() - started, 1)
        self.history.append(row)
        if r1 is None or self.best_state is None or r1 > (self.best_recall[0] or -1.0):  # no validation: keep the latest
            self.best_epoch, self.best_recall = self.epoch, (r1, r10)
            self.best_state = {k: v.detach().clone() for k, v in self.net.trainable_state().items()}
        return row

    @torch.no_grad()
    def validate(self) -> tuple[float | None, float | None]:
        """Recall@1/@10 of the validation photos (with the query-time centre-crop
        average) against the trained products' catalog images, product-level."""
        c = self.cache
        if len(c["val_y"]) == 0 or len(c["gal_y"]) == 0:
            return None, None
        query = self.net.combine(c["val_z"].to(self.device), self._adapted(c["val_x"]))
        query = F.normalize(query + self.net.combine(c["crop_z"].to(self.device), self._adapted(c["crop_x"])), dim=1)
        gallery = self.net.combine(c["gal_z"].to(self.device), self._adapted(c["gal_x"]))
        sims = query @ gallery.T
        per_product = torch.full((len(query), self.n_products), -2.0, device=self.device)
        per_product.scatter_reduce_(1, c["gal_y"].to(self.device).expand(len(query), -1), sims, reduce="amax")
        top = per_product.topk(min(10, self.n_products), dim=1).indices.cpu()
        truth = c["val_y"][:, None]
        return float((top[:, :1] == truth).any(1).float().mean()), float((top == truth).any(1).float().mean())

    def should_stop(self) -> bool:
        if self.best_recall[0] is None:
            return False
        return self.epoch - self.best_epoch >= self.config.patience

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.net.load_trainable_state(self.best_state)

    def save(self, path: Path) -> None:
        state = {
            "epoch": self.epoch,
            "net": self.net.trainable_state(),
            "proxies": self.proxies.detach(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "history": self.history,
            "best_epoch": self.best_epoch,
            "best_recall": self.best_recall,
            "best_state": self.best_state,
        }
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    def restore(self, path: Path) -> int:
        state = torch.load(path, weights_only=False)
        self.net.load_trainable_state(state["net"])
        with torch.no_grad():
            self.proxies.copy_(state["proxies"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.epoch, self.history = state["epoch"], state["history"]
        self.best_epoch, self.best_recall, self.best_state = state["best_epoch"], state["best_recall"], state["best_state"]
        return self.epoch


def _class_means(
    vectors: torch.Tensor, labels: torch.Tensor, n: int, fallback: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """Normalised mean vector per class (zero for a class without vectors); classes
    without vectors take ``fallback``'s (vectors, labels) mean instead, if given."""
    sums = torch.zeros(n, vectors.shape[1], device=vectors.device)
    sums.index_add_(0, labels.to(sums.device), vectors)
    empty = sums.norm(dim=1) == 0
    if fallback is not None and empty.any():
        extra = torch.zeros_like(sums)
        extra.index_add_(0, fallback[1].to(sums.device), fallback[0].to(sums.device))
        sums[empty] = extra[empty]
    return F.normalize(sums, dim=1)

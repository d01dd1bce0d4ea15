"""The fine-tuning loop over cached trunk activations.

Normalised-softmax loss against one learnable proxy per label (product or
category), initialised from the label's catalog images; the loss scores the same
blended similarity that search uses (zero-shot part fixed), so training learns
what the zero-shot part gets wrong. Validation searches the catalog images with
held-out photos: product Recall@1/@10 (ties between epochs broken by the mean
reciprocal rank), or category precision@10; everything that affects the result (weights, proxies,
optimiser, random generator, best epoch) is checkpointed, so a resumed run ends
where an uninterrupted one does.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .adapter import AdaptedNet
from .config import FinetuneConfig
from .fsutil import atomic_write
from .training_data import TrainingData

__all__ = ["Trainer", "class_means"]


class Trainer:
    """Trains an :class:`AdaptedNet`'s tail, head and projection, plus one proxy per
    product, on a cache of trunk activations; keeps the best epoch's weights."""

    def __init__(
        self, net: AdaptedNet, cache: dict[str, torch.Tensor], data: TrainingData, config: FinetuneConfig, device: torch.device
    ) -> None:
        self.net, self.cache, self.config, self.device = net, cache, config, device
        self.level = data.level
        self.key = "val_precision_at_10" if data.level == "category" else "val_recall_at_1"  # picks the best epoch
        self.n_products = len(data.products)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.zero_proxies = class_means(
            cache["gal_z"], cache["gal_y"], self.n_products, fallback=(cache["train_z"], cache["train_y"])
        )
        with torch.no_grad():
            init = class_means(self._adapted(cache["gal_x"]), cache["gal_y"], self.n_products)
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
        self.best_metrics: dict[str, float] = {}
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
        steps = len(range(0, len(order), self.config.batch_size))
        for step, start in enumerate(bar):
            self._schedule(self.epoch * steps + step, self.config.epochs * steps)
            idx = order[start : start + self.config.batch_size]
            maps = self._crop(x[idx].to(self.device).float())
            out = self.net.combine(z[idx].to(self.device), self.net.adapted(maps))
            loss = self._loss(out, y[idx].to(self.device))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        self.epoch += 1
        metrics = {k: round(v, 4) for k, v in (self.validate() or {}).items()}
        row: dict[str, float] = {"epoch": self.epoch, "loss": round(total / max(seen, 1), 5), **metrics}
        row["seconds"] = round(time.perf_counter() - started, 1)
        self.history.append(row)
        if not metrics or self.best_state is None or self._rank(metrics) > self._rank(self.best_metrics):
            self.best_epoch, self.best_metrics = self.epoch, metrics  # no validation: keep the latest
            self.best_state = {k: v.detach().clone() for k, v in self.net.trainable_state().items()}
        return row

    def _rank(self, metrics: dict[str, float]) -> tuple[float, float]:
        """How an epoch's validation compares: the level's metric, ties broken by the
        true product's mean reciprocal rank. A few hundred held-out photos move
        Recall@1 in steps of 1/n, so epochs tie often, and the earlier of a tie
        was kept blindly (grocery: epochs 2 and 4, when later epochs scored higher
        on the val photos)."""
        return metrics.get(self.key, -1.0), metrics.get("val_mrr", -1.0)

    def _schedule(self, step: int, total: int) -> None:
        """Set this batch's learning rates: the configured ones, or a half cosine
        from them down to 0 at the last planned step."""
        factor = 1.0
        if self.config.lr_schedule == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))
        base = (self.config.lr_backbone, self.config.lr_head)
        for group, lr in zip(self.optimizer.param_groups, base, strict=True):
            group["lr"] = lr * factor

    def _loss(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Normalised softmax over every label's proxy, with the margin."""
        return F.cross_entropy(self._cosines(out, labels) / self.config.temperature, labels)

    def _cosines(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each sample's cosine to every label's proxy, the true label's lowered by the margin."""
        cosines = out @ self._proxy_matrix().T
        if self.config.margin:  # CosFace: the true proxy must win by a margin, not just win
            cosines = cosines - self.config.margin * F.one_hot(labels, cosines.shape[1])
        return cosines

    def _crop(self, maps: torch.Tensor) -> torch.Tensor:
        """A random crop of the cached activation maps, one size per batch: each
        epoch sees the cached views anew instead of memorising them (pooling takes
        any size). ``feature_crop`` is the smallest side kept; 1 turns it off."""
        height, width = maps.shape[-2:]
        low = self.config.feature_crop
        if low >= 1.0:
            return maps
        draw = torch.rand(3, generator=self.generator).tolist()
        side = low + (1 - low) * draw[0]
        h, w = max(1, round(height * side)), max(1, round(width * side))
        top, left = int(draw[1] * (height - h + 1)), int(draw[2] * (width - w + 1))
        return maps[..., top : top + h, left : left + w]

    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        """The validation photos (with the query-time centre-crop average) searched
        against the catalog images: product Recall@1/@10 for product labels,
        category precision@10 for category labels; None without validation."""
        c = self.cache
        if len(c["val_y"]) == 0 or len(c["gal_y"]) == 0:
            return None
        query = self.net.combine(c["val_z"].to(self.device), self._adapted(c["val_x"]))
        query = F.normalize(query + self.net.combine(c["crop_z"].to(self.device), self._adapted(c["crop_x"])), dim=1)
        gallery = self.net.combine(c["gal_z"].to(self.device), self._adapted(c["gal_x"]))
        sims = query @ gallery.T
        truth = c["val_y"][:, None]
        if self.level == "category":
            top = sims.topk(min(10, len(gallery)), dim=1).indices.cpu()
            return {"val_precision_at_10": float((c["gal_y"][top] == truth).float().mean())}
        per_product = torch.full((len(query), self.n_products), -2.0, device=self.device)
        per_product.scatter_reduce_(1, c["gal_y"].to(self.device).expand(len(query), -1), sims, reduce="amax")
        top = per_product.topk(min(10, self.n_products), dim=1).indices.cpu()
        true_sim = per_product.gather(1, truth.to(self.device))
        rank = 1 + (per_product > true_sim).sum(1)  # 1 = the true product first
        return {
            "val_recall_at_1": float((top[:, :1] == truth).any(1).float().mean()),
            "val_recall_at_10": float((top == truth).any(1).float().mean()),
            "val_mrr": float((1.0 / rank.float()).mean()),
        }

    def should_stop(self) -> bool:
        if not self.best_metrics:
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
            "best_metrics": self.best_metrics,
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
        self.best_epoch, self.best_metrics, self.best_state = state["best_epoch"], state["best_metrics"], state["best_state"]
        return self.epoch


def class_means(
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

#!/usr/bin/env python3
"""Benchmark (not a test): fine-tuning levers on the grocery protocol A (issue 11, part 2).

Each variant is a set of ``FinetuneConfig`` overrides. The variants train on all of
``train-pairs.csv`` and are scored after every epoch on the protocol's val photos
(``queries-val.csv``, with the query-time centre-crop average) against the 81
iconic images: product Recall@1/@10, exactly what ``Trainer.validate`` measures.
The trunk activation cache is built once per (train_from, views, seed) and reused
by every variant and by a rerun; the base index is the 81 iconic images centred on
the (unlabelled) train photos, as ``scripts/bench_adapt.sh`` builds it. No early
stopping here: the table shows each epoch, so the best epoch is visible (it is
picked on the val photos: an optimistic number; ``bench_adapt.sh`` measures the
shipped defaults end to end, with their own held-out split).

``--protocol B`` trains on ``train-pairs-B.csv`` (half of the products) instead and
scores the seen and the unseen products' val photos separately against all 81
iconic images. After the last epoch every variant is also scored (``final``) with

  * ``blend_unseen=W``: a per-product blend weight, the gallery vector of a product
    without training photos keeping a zero-shot share W instead of the trained 0.5
    (the query keeps 0.5), the lever aimed at protocol B's unseen products;
  * ``+train photos``: the training photos' cached (augmented) views added to the
    gallery as images of their products;
  * ``+photo means`` / ``+proxies``: one more vector per product, the mean of its
    training photos' vectors or its trained proxy; ``... only``: that vector instead
    of the iconic image.

``ema`` variants also score an exponential moving average of the weights (each
epoch's row: the average; ``raw_*``: the weights as trained). Every run saves its
last weights in ``--work``; ``--reuse`` scores them again without training.

``subcentre3`` is sub-centre ArcFace's proxy side (3 proxies per product, a photo
scored against its nearest) with the CosFace margin, trained here by a subclass of
``Trainer`` (not a library option: it did not help). ``fresh4`` trains each epoch
on one of 4 cached views (fresh augmentation); ``fresh4-hardneg`` adds hard negatives
between look-alike products (HARD_NEGATIVES).

    python scripts/bench_finetune.py --work DIR [--variants base crop60 ...] [--epochs 5] [--protocol A|B] [--reuse]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

# The levers were measured with margin 0 (the default before margin 0.2 was adopted)
# and hue jitter 0.05 (the product-level default before "hue0"); their variants keep
# them, so a rerun reproduces the README's table.
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},  # the library defaults of stop 20 (hue jitter 0.05); "hue0" is today's
    "margin0": {"margin": 0.0},
    "margin01": {"margin": 0.1},
    "margin02": {"margin": 0.2},
    "crop70": {"feature_crop": 0.7, "margin": 0.0},
    "crop50": {"feature_crop": 0.5, "margin": 0.0},
    "views4": {"views": 4, "margin": 0.0},
    "stage3": {"train_from": "stage3", "margin": 0.0},
    "zsw03": {"zero_shot_weight": 0.3, "margin": 0.0},
    "t01": {"temperature": 0.1, "margin": 0.0},
    "lr3e-4": {"lr_backbone": 3e-4, "margin": 0.0},
    "wd1e-2": {"weight_decay": 1e-2, "margin": 0.0},
    "cosine": {"lr_schedule": "cosine"},  # margin 0.2, both learning rates on a half cosine to 0
    "cosine-lr2x": {"lr_schedule": "cosine", "lr_backbone": 2e-4, "lr_head": 2e-3},
    "cosine-m03": {"lr_schedule": "cosine", "margin": 0.3},
    "subcentre3": {},  # margin 0.2 (the default) with 3 proxies per product: see SUBCENTRES
    "proxyanchor": {},  # Proxy Anchor loss (Kim et al., CVPR 2020) instead of the normalised softmax: PROXY_ANCHOR
    "hue0": {"hue_jitter": 0.0},  # margin 0.2, no hue shift in the cached views' colour jitter
    "hue0-ema": {"hue_jitter": 0.0},  # the same, plus EMA
    "ema": {},  # margin 0.2 (the default), scored with an exponential moving average of the weights: EMA
    # fresh views: 4 cached views, epoch e trains on view e only (FRESH), instead of
    # every epoch on the same 2 views: half the steps per epoch, new views each epoch
    "fresh4": {"hue_jitter": 0.0, "views": 4},
    "views4-hue0": {"hue_jitter": 0.0, "views": 4},  # its control: all 4 views every epoch
    "fresh4-hardneg": {"hue_jitter": 0.0, "views": 4},  # fresh4 plus HARD_NEGATIVES
}
FRESH = {"fresh4", "fresh4-hardneg"}
# hard negatives between look-alike products: each product's k nearest proxies (by
# the proxies' own similarity, recomputed every batch) must be beaten by this much
# more than the margin; compared with fresh4, on the same cache
HARD_NEGATIVES = {"fresh4-hardneg": (3, 0.1)}
SUBCENTRES = {"subcentre3": 3}
PROXY_ANCHOR = {"proxyanchor": (32.0, 0.1)}  # the paper's alpha and delta
EMA = {"ema": 0.995, "hue0-ema": 0.995}  # decay per batch: a horizon of ~200 batches, about 2 epochs
BLENDS = (0.5, 0.7, 0.85, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="cache folder (reused by a rerun)")
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--variants", nargs="+", default=["margin0", "defaults"], choices=sorted(VARIANTS))
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--protocol", choices=["A", "B"], default="A")
    ap.add_argument("--reuse", action="store_true", help="score the weights a previous run saved instead of training")
    args = ap.parse_args()

    import torch

    from vsearch import Engine
    from vsearch.adapter import AdaptedNet, AdapterConfig
    from vsearch.config import FinetuneConfig
    from vsearch.projection import Projection
    from vsearch.sources import read_pairs
    from vsearch.training import Trainer
    from vsearch.training_cache import load_or_build_cache
    from vsearch.training_data import prepare

    torch.set_num_threads(2)
    protocols = args.work / "protocols"
    grocery = protocols / "grocery"
    if not (grocery / "train-pairs.csv").exists():
        cmd = [sys.executable, "scripts/make_protocols.py", "--data", str(args.data), "--out", str(protocols)]
        subprocess.run(cmd, check=True)
    base = args.work / "base"
    if not (base / "manifest.json").exists():
        vs = str(Path(sys.executable).with_name("vsearch"))
        cmd = [vs, "ingest", str(grocery / "gallery.csv"), "--index", str(base), "--center-on", str(grocery / "center.csv")]
        subprocess.run([*cmd, "--quiet"], check=True)
    train_items = read_pairs(grocery / ("train-pairs.csv" if args.protocol == "A" else "train-pairs-B.csv"))
    with open(grocery / "queries-val.csv", newline="") as fh:
        val_items = [(row["image"], row["expected_id"]) for row in csv.DictReader(fh)]
    with open(grocery / "gallery.csv", newline="") as fh:
        iconic = [(row["image"], row["id"]) for row in csv.DictReader(fh)]
    trained_products = {it.product_id for it in train_items}

    results = []
    with Engine.open(base) as engine:
        for name in args.variants:
            # hue jitter 0.05: what every lever before "hue0" was measured with (the default since is none)
            base_config = FinetuneConfig(epochs=max(args.epochs, 1), val_fraction=0.0, hue_jitter=0.05)
            config = replace(base_config, **VARIANTS[name])
            torch.manual_seed(config.seed)
            adapter = AdapterConfig(engine.manifest.model, config.train_from, config.head_dim, config.zero_shot_weight)
            net = AdaptedNet(adapter, Projection.load(engine.paths.projection))
            data = prepare(engine, train_items, config)
            data.val = sorted(v for v in val_items if v[1] in trained_products)  # per-epoch: seen products
            tag = "" if args.protocol == "A" else "B-"
            hue = "" if config.hue_jitter == 0.05 else f"-h{config.hue_jitter}"
            work = args.work / f"cache-{tag}{config.train_from}-v{config.views}-s{config.seed}{hue}"
            work.mkdir(exist_ok=True)
            started = time.perf_counter()
            cache = load_or_build_cache(work, net, data, config, torch.device("cpu"), quiet=True)
            cache_s = time.perf_counter() - started
            cpu = torch.device("cpu")
            evalset = eval_cache(args.work / f"eval-{config.train_from}.pt", net, iconic, sorted(val_items))
            k = SUBCENTRES.get(name, 1)
            if k > 1:
                trainer = subcentre_trainer(net, cache, data, config, cpu, k)
            elif name in PROXY_ANCHOR:
                trainer = proxy_anchor_trainer(net, cache, data, config, cpu, *PROXY_ANCHOR[name])
            elif name in EMA:
                trainer = ema_trainer(net, cache, data, config, cpu, EMA[name])
            elif name in FRESH:
                trainer = fresh_trainer(net, cache, data, config, cpu, HARD_NEGATIVES.get(name))
            else:
                trainer = Trainer(net, cache, data, config, cpu)
            curve = [trainer.validate() or {}]
            saved = args.work / f"trained-{tag}{name}-e{args.epochs}.pt"
            reuse = args.reuse and saved.exists()
            if reuse:  # score the saved weights again, no training
                trainer.restore(saved)
                curve = [curve[0], *trainer.history]
            for _ in range(0 if reuse else args.epochs):  # 0: the untrained head only
                row = trainer.run_epoch(quiet=True)
                curve.append(row)
                print(f"{name} epoch {int(row['epoch'])}: {json.dumps(row)}", flush=True)
            trainer.save(saved)
            final = final_scores(trainer, evalset, trained_products, cache, len(data.train), data.products)
            print(f"{name} final: {json.dumps(final)}", flush=True)
            if name in EMA:  # the same run's averaged weights
                trainer.swap()
                averaged = final_scores(trainer, evalset, trained_products, cache, len(data.train), data.products)
                final.update({f"ema {k}": v for k, v in averaged.items()})
                print(f"{name} final (ema): {json.dumps(final)}", flush=True)
            results.append(
                {"variant": name, "overrides": VARIANTS[name], "cache_s": round(cache_s, 1), "curve": curve, "final": final}
            )

    print(f"\n{'variant':<16} {'cache s':>8} {'s/epoch':>8}  R@1 / R@10 by epoch (0 = untrained head)")
    for r in results:
        per_epoch = [row.get("seconds", 0.0) for row in r["curve"][1:]]
        cells = "  ".join(f"{row['val_recall_at_1']:.3f}/{row['val_recall_at_10']:.3f}" for row in r["curve"])
        print(f"{r['variant']:<16} {r['cache_s']:>8.0f} {sum(per_epoch) / max(len(per_epoch), 1):>8.0f}  {cells}")
    print("\nafter the last epoch, all 81 iconic images as the gallery (R@1 / R@10 per product group):")
    for r in results:
        for setting, groups in r["final"].items():
            cells = "  ".join(f"{g} {v[0]:.3f}/{v[1]:.3f}" for g, v in groups.items())
            print(f"{r['variant']:<16} {setting:<22} {cells}")
    suffix = "" if args.protocol == "A" else "-B"
    (args.work / f"finetune-levers{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")


def eval_cache(path: Path, net: Any, iconic: list[tuple[str, str]], val: list[tuple[str, str]]) -> dict[str, Any]:
    """Trunk activations of the 81 iconic images and of the val photos (+ their 0.8
    centre crops): the trunk is frozen, so one file serves every variant."""
    import torch
    from tqdm import tqdm

    from vsearch.embed import Preprocess, center_crop
    from vsearch.training_cache import _encode

    if path.exists():
        cached: dict[str, Any] = torch.load(path, weights_only=False)
        return cached
    preprocess = Preprocess(net.config.base)

    def cropped(image: Any) -> Any:
        return preprocess(center_crop(image, 0.8))

    with torch.random.fork_rng(devices=[]), tqdm(disable=True) as bar:
        gal = _encode(net, [(src, preprocess) for src, _ in iconic], torch.device("cpu"), bar)
        full = _encode(net, [(src, preprocess) for src, _ in val], torch.device("cpu"), bar)
        crop = _encode(net, [(src, cropped) for src, _ in val], torch.device("cpu"), bar)
    out = {"gal": gal, "gal_ids": [pid for _, pid in iconic], "val": full, "crop": crop, "val_ids": [pid for _, pid in val]}
    torch.save(out, path)
    return out


def final_scores(
    trainer: Any, ev: dict[str, Any], trained: set[str], cache: dict[str, Any], n_train: int, labels_of: list[str]
) -> dict[str, dict[str, tuple[float, float]]]:
    """R@1/R@10 per product group (seen / unseen by the training) with all iconic
    images as the gallery, for each per-product blend weight, and with the training
    photos' views added to the gallery."""
    import torch
    import torch.nn.functional as F

    from vsearch.training import class_means

    net, w = trainer.net, trainer.net.weight
    with torch.no_grad():
        adapted = trainer._adapted
        # the query as search builds it: the photo's and its centre crop's vectors averaged
        q = F.normalize(net.combine(ev["val"][1], adapted(ev["val"][0])) + net.combine(ev["crop"][1], adapted(ev["crop"][0])))
        dz = q.shape[1] - trainer.config.head_dim
        gz, ga = ev["gal"][1], adapted(ev["gal"][0])
        zsim, asim = q[:, :dz] @ gz.T, q[:, dz:] @ ga.T  # query parts already carry sqrt(w), sqrt(1-w)
        products = sorted(set(ev["gal_ids"]) | set(ev["val_ids"]))
        index = {pid: i for i, pid in enumerate(products)}
        gal_y = torch.tensor([index[p] for p in ev["gal_ids"]])
        val_y = torch.tensor([index[p] for p in ev["val_ids"]])
        seen = torch.tensor([p in trained for p in ev["val_ids"]])
        unseen_gal = torch.tensor([p not in trained for p in ev["gal_ids"]])
        out: dict[str, dict[str, tuple[float, float]]] = {}
        for blend in BLENDS:
            wg = torch.where(unseen_gal, torch.tensor(blend), torch.tensor(w))
            sims = zsim * wg.sqrt() + asim * (1 - wg).sqrt()
            out[f"blend_unseen={blend}"] = _recall(sims, gal_y, val_y, seen, len(products))
        # the training photos as product images (their cached views; catalog repeats excluded)
        views = trainer.config.views
        per_view = len(cache["train_y"]) // views
        keep = torch.cat([torch.arange(v * per_view, v * per_view + n_train) for v in range(views)])
        tz, ta = cache["train_z"][keep], adapted(cache["train_x"][keep])
        t_labels = [labels_of[int(i)] for i in cache["train_y"][keep]]
        extra = q[:, :dz] @ (w**0.5 * tz).T + q[:, dz:] @ ((1 - w) ** 0.5 * ta).T
        base = zsim * w**0.5 + asim * (1 - w) ** 0.5
        sims = torch.cat([base, extra], dim=1)
        labels = torch.cat([gal_y, torch.tensor([index[p] for p in t_labels])])
        out["+train photos"] = _recall(sims, labels, val_y, seen, len(products))
        # one extra vector per trained product: the mean of its training photos' vectors
        t_y = torch.tensor([index[p] for p in t_labels])
        means = class_means(net.combine(tz, ta), t_y, len(products))
        has = means.norm(dim=1) > 0
        proto = q @ means[has].T
        proto_y = torch.arange(len(products))[has]
        out["+photo means"] = _recall(torch.cat([base, proto], 1), torch.cat([gal_y, proto_y]), val_y, seen, len(products))
        # or the trained proxies themselves (a product vector learnt from its photos)
        order = torch.tensor([index[p] for p in labels_of])
        proxies = trainer._proxy_matrix()
        psims = q @ proxies.T
        out["+proxies"] = _recall(torch.cat([base, psims], 1), torch.cat([gal_y, order]), val_y, seen, len(products))
        out["proxies only"] = _recall(psims, order, val_y, seen, len(products))
        out["photo means only"] = _recall(proto, proto_y, val_y, seen, len(products))
    return out


def subcentre_trainer(net: Any, cache: Any, data: Any, config: Any, device: Any, k: int) -> Any:
    """Sub-centre ArcFace's proxy side on vsearch's Trainer: ``k`` proxies per
    product (the mean plus small noise), a photo scored against the nearest."""
    import torch
    import torch.nn.functional as F

    from vsearch.training import Trainer

    class _SubCentre(Trainer):
        def __init__(self) -> None:
            super().__init__(net, cache, data, config, device)
            with torch.no_grad():
                init = self.proxies.detach().repeat_interleave(k, 0)
                init = F.normalize(init + 0.05 * torch.randn(init.shape, generator=self.generator), dim=1)
            self.proxies = torch.nn.Parameter(init)
            self.optimizer.param_groups[1]["params"][-1] = self.proxies  # no optimiser state yet

        def _proxy_matrix(self) -> torch.Tensor:
            return self.net.combine(self.zero_proxies.repeat_interleave(k, 0), F.normalize(self.proxies, dim=1))

        def _cosines(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            cosines = (out @ self._proxy_matrix().T).view(len(out), -1, k).amax(dim=2)
            return cosines - self.config.margin * F.one_hot(labels, cosines.shape[1])

    return _SubCentre()


def proxy_anchor_trainer(net: Any, cache: Any, data: Any, config: Any, device: Any, alpha: float, delta: float) -> Any:
    """Proxy Anchor loss on vsearch's Trainer: each proxy pulls its batch photos in and
    pushes the others out, weighted by how hard each is (a soft hard-negative mining
    over the whole batch, where the softmax weighs each photo's own proxies)."""
    import torch
    import torch.nn.functional as F

    from vsearch.training import Trainer

    class _ProxyAnchor(Trainer):
        def _loss(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            cos = out @ self._proxy_matrix().T
            pos = F.one_hot(labels, cos.shape[1]).bool()
            pull = torch.exp(-alpha * (cos - delta)).masked_fill(~pos, 0).sum(0)
            push = torch.exp(alpha * (cos + delta)).masked_fill(pos, 0).sum(0)
            present = pos.any(0)
            return torch.log1p(pull)[present].sum() / present.sum() + torch.log1p(push).sum() / cos.shape[1]

    return _ProxyAnchor(net, cache, data, config, device)


def fresh_trainer(net: Any, cache: Any, data: Any, config: Any, device: Any, hard: tuple[int, float] | None = None) -> Any:
    """vsearch's Trainer, each epoch on one of the cached views only (epoch e: view
    e mod views), so that no epoch sees a view an earlier one saw while there are
    views left: fresh augmentation, paid for once in the cache. ``hard``: (k, extra),
    see HARD_NEGATIVES."""
    from vsearch.training import Trainer

    per_view = len(cache["train_y"]) // config.views
    base = Trainer if hard is None else hard_negative_class(*hard)

    class _Fresh(base):
        def run_epoch(self, quiet: bool) -> dict[str, float]:
            full = {k: self.cache[k] for k in ("train_x", "train_z", "train_y")}
            view = slice((self.epoch % config.views) * per_view, (self.epoch % config.views + 1) * per_view)
            self.cache.update({k: v[view] for k, v in full.items()})
            try:
                return super().run_epoch(quiet)
            finally:
                self.cache.update(full)

    return _Fresh(net, cache, data, config, device)


def hard_negative_class(k: int, extra: float) -> Any:
    """vsearch's Trainer whose loss makes each photo beat the k proxies nearest its
    product's own (its look-alikes: the peppers, the red apples) by ``extra`` more
    than the other proxies."""
    import torch
    import torch.nn.functional as F

    from vsearch.training import Trainer

    class _HardNegatives(Trainer):
        def _cosines(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            cosines = super()._cosines(out, labels)
            with torch.no_grad():
                proxies = F.normalize(self._proxy_matrix(), dim=1)
                near = proxies @ proxies.T
                near.fill_diagonal_(-2.0)
                look_alikes = near.topk(k, dim=1).indices[labels]
            return cosines + torch.zeros_like(cosines).scatter_(1, look_alikes, extra)

    return _HardNegatives


def ema_trainer(net: Any, cache: Any, data: Any, config: Any, device: Any, decay: float) -> Any:
    """vsearch's Trainer with an exponential moving average of the trained weights
    (tail, head, projection and proxies), updated after every batch; each epoch's
    row reports both the raw weights' and the average's validation scores."""
    import torch

    from vsearch.training import Trainer

    class _Ema(Trainer):
        def __init__(self) -> None:
            super().__init__(net, cache, data, config, device)
            self.params = [p for m in net.trainable().values() for p in m.parameters()] + [self.proxies]
            self.shadow = [p.detach().clone() for p in self.params]
            step = self.optimizer.step

            def step_and_average(*args: Any, **kwargs: Any) -> Any:
                result = step(*args, **kwargs)
                with torch.no_grad():
                    for s, p in zip(self.shadow, self.params, strict=True):
                        s.lerp_(p, 1 - decay)
                return result

            self.optimizer.step = step_and_average  # type: ignore[method-assign]

        def swap(self) -> None:
            with torch.no_grad():
                for s, p in zip(self.shadow, self.params, strict=True):
                    tmp = p.detach().clone()
                    p.copy_(s)
                    s.copy_(tmp)

        def validate(self) -> dict[str, float] | None:
            raw = super().validate()
            self.swap()
            averaged = super().validate()
            self.swap()
            if raw is None or averaged is None:
                return raw
            return {**averaged, **{f"raw_{k}": v for k, v in raw.items()}}

    return _Ema()


def _recall(sims: Any, gal_y: Any, val_y: Any, seen: Any, n: int) -> dict[str, tuple[float, float]]:
    import torch

    per_product = torch.full((len(sims), n), -9.0)
    per_product.scatter_reduce_(1, gal_y.expand(len(sims), -1), sims, reduce="amax")
    top = per_product.topk(10, dim=1).indices
    hit1 = (top[:, :1] == val_y[:, None]).any(1).float()
    hit10 = (top == val_y[:, None]).any(1).float()
    groups = {"all": torch.ones_like(seen), "seen": seen, "unseen": ~seen}
    return {g: (round(float(hit1[m].mean()), 4), round(float(hit10[m].mean()), 4)) for g, m in groups.items() if m.any()}


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The GPU checks of issue 10 (section 6): one short run on a machine with a GPU.

Does vsearch's GPU path give the CPU's answers, and how fast is it? Each check prints
one line, PASS / FAIL / SKIP and what it measured:

1. search_equal  faiss GPU search (``VectorIndex.to_gpu``, as the engine serves) on the
                 CPU index's vectors: Flat ids equal and scores within 1e-3; IVF,SQ8 at
                 the same nprobe: top-10 overlap with the CPU >= 0.99 and recall@10
                 against the exact search within 0.01; filtered (category blocks,
                 ``VectorIndex.search``'s filtered path) ids equal, every hit allowed.
                 "Ids equal" forgives swaps between hits whose scores are within 1e-4.
                 Information: whether faiss's GPU search honours an IDSelector.
2. ivf_train     an IVF whose k-means ran on the GPU (the IVF's ``clustering_index``)
                 reaches the CPU-trained index's recall@10, less at most 0.01.
3. ingest_rate   ``Engine.ingest`` (the ``vsearch ingest`` path: files -> decode workers
                 -> model -> catalog -> index) of JPEGs generated here, default model on
                 cuda under the embedder's autocast; images/s with the CLI's defaults
                 (batch 32, the library's decoding workers), target >= 2000 (anchor:
                 clip-retrieval embeds ~1500 img/s on an RTX 3080); shown too: batch 64
                 with a worker per core, and the bare forward in fp32, bf16 and fp16
                 autocast (and fp16 channels_last), what the model alone allows.
4. batching      8 clients searching through ``SearchService``'s model queue: batch_max
                 16 (the server's default on a GPU) against 1; throughput ratio, target
                 >= 1.5.

Everything runs in one process within ``--budget-s`` seconds (default 280; a check
that would not fit is skipped, and in the GPU run a watchdog ends the process past the
budget, keeping what finished). A JSON summary goes to ``--out``
(default ``$OUT/gpu_check.json`` when ``$OUT`` is set), rewritten after each check. The
exit status is 1 when a check fails, 2 when no GPU is visible, 3 past the budget.

``--cpu`` runs every check small, on the CPU, with the tiny test model: the search
comparisons run against a CPU copy of the index and the training against the same
clustering_index route on a CPU flat index, so the machinery is exercised; checks
that need a GPU to mean anything say SKIP (FAIL if the comparison itself fails).

    timeout 330 .venv/bin/python scripts/gpu_check.py
    .venv/bin/python scripts/gpu_check.py --cpu --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from vsearch.config import ServeConfig
from vsearch.embed import Embedder, default_workers, pool
from vsearch.engine import DEFAULT_MODEL, Engine
from vsearch.index import DEFAULT_NPROBE, VectorIndex, gpu_available
from vsearch.projection import l2_normalize
from vsearch.query import ImageQuery, SearchOptions
from vsearch.service import SearchService, default_batch_max
from vsearch.sizing import ivf_nlist
from vsearch.sources import Item
from vsearch.topk import recall_at_k

K = 10
TIE = 1e-4  # scores closer than this may rank either way (GPU and CPU sum in different orders)
INGEST_TARGET = 2000.0  # images/s, Lite2 on an H200
BATCHING_TARGET = 1.5  # throughput with micro-batching / without, 8 clients
CATEGORIES = 20


@dataclass(frozen=True)
class Sizes:
    vectors: int  # indexed by checks 1 and 2
    dim: int
    queries: int
    nprobe: int
    images: int  # per timed ingest run
    warm_images: int  # ingested first, untimed (fits the projection: PCA wants > 512); also the queries
    image_size: tuple[int, int]
    clients: int
    client_seconds: float  # each batching run, at most
    client_queries: int  # per client and run, at most
    forward_seconds: float  # each bare-forward measurement, at least
    model: str
    device: str
    workers: int | None  # ingest's decoding processes; None: the library's default
    processes: int  # that write the generated images


GPU = Sizes(
    vectors=120_000, dim=256, queries=1000, nprobe=DEFAULT_NPROBE,
    images=8000, warm_images=600, image_size=(400, 500),
    clients=8, client_seconds=6.0, client_queries=1_000_000, forward_seconds=1.0,
    model=DEFAULT_MODEL, device="cuda", workers=None, processes=max(1, min(16, (os.cpu_count() or 1) - 1)),
)  # fmt: skip
CPU = Sizes(
    vectors=3000, dim=32, queries=100, nprobe=2,
    images=16, warm_images=8, image_size=(96, 80),
    clients=8, client_seconds=30.0, client_queries=2, forward_seconds=0.0,
    model="tiny-test", device="cpu", workers=0, processes=1,
)  # fmt: skip


@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL or SKIP
    numbers: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        flat = " ".join(f"{k}={_fmt(v)}" for k, v in self.numbers.items() if not isinstance(v, (dict, list)))
        return f"{self.status:4} {self.name:12} {self.seconds:6.1f}s  {flat}" + (f"  -- {self.note}" if self.note else "")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def verdict(ok: bool, gpu: bool) -> str:
    """FAIL when a comparison failed; otherwise PASS on a GPU, SKIP on the CPU (where
    the comparison ran against a CPU stand-in and says nothing about a GPU)."""
    return "FAIL" if not ok else "PASS" if gpu else "SKIP"


# data --------------------------------------------------------------------------------
def clustered(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` L2-normalised vectors around sqrt(n) centres (image embeddings cluster, and
    IVF recall means something on clustered data only), and each one's cluster."""
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.standard_normal((max(8, int(np.sqrt(n))), d)).astype(np.float32))
    labels = rng.integers(0, len(centres), n)
    noise = rng.standard_normal((n, d)).astype(np.float32) * (1.0 / np.sqrt(d))
    return l2_normalize(centres[labels] + noise), labels


def category_blocks(ids: np.ndarray, labels: np.ndarray, seed: int = 1) -> dict[str, np.ndarray]:
    """Category -> sorted ids, a category mostly one cluster's (10% of ids elsewhere)."""
    rng = np.random.default_rng(seed)
    cats = labels % CATEGORIES
    moved = rng.random(len(ids)) < 0.1
    cats[moved] = rng.integers(0, CATEGORIES, int(moved.sum()))
    return {f"c{c:02d}": np.sort(ids[cats == c]) for c in range(CATEGORIES)}


def filters(blocks: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Filtered searches of three widths: one category, half of them, all but one."""
    names = sorted(blocks)
    return {
        "one": {names[0]: blocks[names[0]]},
        "half": {n: blocks[n] for n in names[::2]},
        "all_but_one": {n: blocks[n] for n in names[1:]},
    }


def exact(xb: np.ndarray, ids: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    """The true top-k ids of ``xq`` among ``xb`` (inner product)."""
    _, pos = faiss.knn(xq, xb, min(k, len(xb)), metric=faiss.METRIC_INNER_PRODUCT)
    return np.asarray(ids[pos])


def ivf_factory(n: int) -> str:
    """The engine's IVF factory for ``n`` vectors (choose_factory's past FLAT_MAX)."""
    return f"IVF{ivf_nlist(n)},SQ8"


# check 1: search ---------------------------------------------------------------------
Mirror = Callable[[VectorIndex], VectorIndex]


def copy_index(index: VectorIndex) -> VectorIndex:
    """An independent copy of ``index`` (direct map and nprobe included)."""
    return VectorIndex(faiss.deserialize_index(faiss.serialize_index(index.index)), index.factory, index.nprobe)


def gpu_mirror(index: VectorIndex) -> VectorIndex:
    """A copy of ``index`` serving its unfiltered searches from the GPU, as the engine's
    index does after ``to_gpu()`` (indexfile.py calls it on every load)."""
    mirrored = copy_index(index)
    if not mirrored.to_gpu():
        raise RuntimeError(f"VectorIndex.to_gpu() kept {index.factory} on the CPU: faiss could not mirror it")
    return mirrored


def compare_equal(expected: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Share of equal ids, position by position; how many differing positions a near-tie
    does not explain (the id ``got`` ranks there scores within TIE of the id
    ``expected`` ranks there: either order is right); the largest score difference."""
    (D0, I0), (D1, I1) = expected, got
    valid = (I0 >= 0) & (I1 >= 0)
    with np.errstate(invalid="ignore"):  # -inf - -inf in the padding
        diff = np.abs(D0 - D1)
        same = I1[:, :, None] == I0[:, None, :]  # got's id at j is expected's at p
        # expected's score for got's id (got's own score for an id expected does not list)
        score = np.where(same.any(axis=2), np.where(same, D0[:, None, :], -np.inf).max(axis=2), D1)
        tie = (np.abs(score - D0) <= TIE) & (diff <= TIE)
    unexplained = (I0 != I1) & ~tie
    return {
        "ids_equal": float(np.mean(I0 == I1)),
        "unexplained": int(unexplained.sum()),
        "max_score_diff": float(diff[valid].max()) if valid.any() else 0.0,
    }


def check_search(sizes: Sizes, mirror: Mirror, gpu: bool) -> Result:
    n, d = sizes.vectors, sizes.dim
    x, labels = clustered(n + sizes.queries, d)
    xb, xq, labels = x[:n], x[n:], labels[:n]
    ids = np.arange(5, 5 + 2 * n, 2, dtype=np.int64)  # not positions: ids are the catalog's
    blocks = category_blocks(ids, labels)
    truth = exact(xb, ids, xq, K)
    numbers: dict[str, Any] = {}
    failures: list[str] = []

    flat = VectorIndex.create("IDMap2,Flat", d)
    flat.add(ids, xb, new=True)
    ivf = VectorIndex.create(ivf_factory(n), d, nprobe=sizes.nprobe)
    ivf.train(xb[: max(ivf.train_size(), ivf.nlist)])
    ivf.add(ids, xb, new=True)
    numbers["ivf"] = f"{ivf.factory}/nprobe{ivf.nprobe}"

    for name, cpu in (("flat", flat), ("ivf", ivf)):
        try:
            other = mirror(cpu)
        except RuntimeError as exc:
            failures.append(f"{name}: {exc}")
            continue
        expected, got = cpu.search(xq, K), other.search(xq, K)
        same = compare_equal(expected, got)
        if name == "flat":
            numbers.update({f"flat_{key}": value for key, value in same.items()})
            if same["unexplained"] or same["max_score_diff"] > 1e-3:
                failures.append("flat results differ")
        else:
            overlap = recall_at_k(got[1], expected[1], K)
            r_cpu, r_other = recall_at_k(expected[1], truth, K), recall_at_k(got[1], truth, K)
            numbers.update(ivf_overlap=overlap, ivf_recall_cpu=r_cpu, ivf_recall_other=r_other)
            if overlap < 0.99 or abs(r_cpu - r_other) > 0.01:
                failures.append("ivf results differ")
        filtered: dict[str, dict[str, Any]] = {}
        for width, allowed in filters(blocks).items():
            expected, got = cpu.search(xq, K, allowed), other.search(xq, K, allowed)
            same = compare_equal(expected, got)
            allowed_ids = np.concatenate(list(allowed.values()))
            hits = np.concatenate([expected[1].ravel(), got[1].ravel()])
            stray = int(np.count_nonzero(~np.isin(hits[hits >= 0], allowed_ids)))
            member = np.isin(ids, allowed_ids)
            recall = recall_at_k(got[1], exact(xb[member], ids[member], xq, K), K)
            filtered[width] = {**same, "recall": recall, "outside": stray, "allowed": len(allowed_ids)}
            if same["unexplained"] or stray:
                failures.append(f"{name} filtered ({width}) differs" + (f": {stray} hits outside the filter" if stray else ""))
        numbers[f"{name}_filtered_unexplained"] = sum(f["unexplained"] for f in filtered.values())
        numbers[f"{name}_filtered_recall_min"] = min(f["recall"] for f in filtered.values())
        numbers[f"{name}_filtered"] = filtered  # per width: one category, half of them, all but one
        numbers[f"{name}_paths"] = dict(other.paths)
        if gpu:
            half = np.concatenate(list(filters(blocks)["half"].values()))
            numbers[f"{name}_gpu_selector"] = gpu_selector_support(cpu, xq, half)
    note = "; ".join(failures) or "filtered searches run on the CPU by design (only unfiltered ones use the mirror)"
    if not gpu and not failures:
        note = "no GPU: compared against a CPU copy"
    return Result("search_equal", verdict(not failures, gpu), numbers, note)


def gpu_selector_support(index: VectorIndex, xq: np.ndarray, allowed: np.ndarray) -> str:
    """Whether faiss's GPU search honours an IDSelector, against the CPU's selector search
    (information: the engine's filtered path never asks the GPU)."""
    selector = faiss.IDSelectorBatch(allowed)  # referenced while params point to it
    params: faiss.SearchParameters = (
        faiss.SearchParametersIVF(sel=selector, nprobe=index.nprobe)  # type: ignore[call-arg]
        if index.nlist
        else faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]
    )
    try:
        resources = faiss.StandardGpuResources()
        got = faiss.index_cpu_to_gpu(resources, 0, index.index).search(xq, K, params=params)
    except RuntimeError as exc:
        return f"unsupported ({str(exc).strip().splitlines()[-1][:80]})"
    expected = index.index.search(xq, K, params=params)
    outside = int(np.count_nonzero(~np.isin(got[1][got[1] >= 0], allowed)))
    return f"overlap {recall_at_k(got[1], expected[1], K):.3f}, {outside} hits outside"


# check 2: IVF training ----------------------------------------------------------------
Trainer = Callable[[VectorIndex, np.ndarray], None]


def train_on(flat: faiss.Index) -> Trainer:
    """Train an IVF with its k-means assignments done by ``flat`` (faiss's
    ``clustering_index``); the rest of the index (direct map, SQ ranges) stays as is."""

    def train(index: VectorIndex, xt: np.ndarray) -> None:
        ivf = faiss.extract_index_ivf(index.index)
        ivf.clustering_index = flat
        try:
            index.train(xt)
        finally:
            ivf.clustering_index = None  # type: ignore[assignment]

    return train


def gpu_trainer(d: int) -> Trainer:
    resources = faiss.StandardGpuResources()
    flat = faiss.index_cpu_to_gpu(resources, 0, faiss.IndexFlatIP(d))
    train = train_on(flat)

    def keep_alive(index: VectorIndex, xt: np.ndarray) -> None:
        _ = resources  # the GPU index needs its resources for as long as it is used
        train(index, xt)

    return keep_alive


def cpu_stand_in(d: int) -> Trainer:
    """The GPU trainer's route (k-means through a clustering_index) on a CPU flat index."""
    return train_on(faiss.IndexFlatIP(d))


def check_ivf_training(sizes: Sizes, trainer: Trainer, gpu: bool) -> Result:
    n, d = sizes.vectors, sizes.dim
    x, _ = clustered(n + sizes.queries, d, seed=2)
    xb, xq = x[:n], x[n:]
    ids = np.arange(n, dtype=np.int64)
    truth = exact(xb, ids, xq, K)
    numbers: dict[str, Any] = {}
    for side, train in (("cpu", lambda index, xt: index.train(xt)), ("other", trainer)):
        index = VectorIndex.create(ivf_factory(n), d, nprobe=sizes.nprobe)
        xt = xb[: max(index.train_size(), index.nlist)]
        start = time.perf_counter()
        train(index, xt)
        numbers[f"train_s_{side}"] = time.perf_counter() - start
        index.add(ids, xb, new=True)
        numbers[f"recall_{side}"] = recall_at_k(index.search(xq, K)[1], truth, K)
    numbers["factory"], numbers["trained_on"] = ivf_factory(n), len(xt)
    numbers["speedup"] = numbers["train_s_cpu"] / max(numbers["train_s_other"], 1e-9)
    ok = numbers["recall_other"] >= numbers["recall_cpu"] - 0.01
    note = "" if ok else "recall@10 of the other training is more than 0.01 below the CPU's"
    if not gpu and ok:
        note = "no GPU: the clustering_index route ran on a CPU flat index"
    return Result("ivf_train", verdict(ok, gpu), numbers, note)


# images -------------------------------------------------------------------------------
def synthetic_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A product-photo-like picture: a light gradient, a few shapes, sensor-like noise
    (so that a JPEG of it costs about what a photo costs to decode)."""
    rng = np.random.default_rng(seed)
    w, h = size
    top, bottom = rng.integers(150, 256, 3), rng.integers(150, 256, 3)
    ramp = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp) * np.ones((1, w, 1), dtype=np.float32)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x0, y0 = int(rng.integers(0, w * 3 // 4)), int(rng.integers(0, h * 3 // 4))
        box = (x0, y0, x0 + int(rng.integers(w // 8, w // 2)), y0 + int(rng.integers(h // 8, h // 2)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    shift = (int(rng.integers(0, h)), int(rng.integers(0, w)))
    noisy = np.asarray(image, dtype=np.int16) + np.roll(_noise(h, w), shift, axis=(0, 1))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


_NOISE: dict[tuple[int, int], np.ndarray] = {}


def _noise(h: int, w: int) -> np.ndarray:
    """One field of noise per size and process (drawing it per image cost more than the JPEG)."""
    if (h, w) not in _NOISE:
        _NOISE[(h, w)] = np.random.default_rng(h * w).normal(0, 4, (h, w, 3)).astype(np.int16)
    return _NOISE[(h, w)]


def _write_one(job: tuple[str, int, tuple[int, int]]) -> int:
    path, seed, size = job
    synthetic_image(seed, size).save(path, format="JPEG", quality=90)
    return os.path.getsize(path)


def write_images(folder: Path, n: int, size: tuple[int, int], processes: int = 1) -> list[Path]:
    """``n`` JPEGs in ``folder``, the same ones every run."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.jpg" for i in range(n)]
    jobs = [(str(p), i, size) for i, p in enumerate(paths)]
    if processes > 1:  # forked: the writers touch neither CUDA nor faiss
        with multiprocessing.get_context("fork").Pool(processes) as workers:
            workers.map(_write_one, jobs, chunksize=32)
    else:
        for job in jobs:
            _write_one(job)
    return paths


def items(paths: list[Path], first: int = 0) -> list[Item]:
    return [Item(f"p{first + i}", str(p), category=f"Cat{(first + i) % CATEGORIES}", title="") for i, p in enumerate(paths)]


# check 3: ingest ----------------------------------------------------------------------
def _vectors(embedder: Embedder, batch: torch.Tensor) -> torch.Tensor:
    """embed_tensor's forward and pooling, without its autocast or the copy back."""
    config = embedder.config
    maps = embedder.backbone(batch, config.layers)
    parts = [F.normalize(pool(m.float(), how, config.gem_p), dim=1) for m, how in zip(maps, config.poolings)]
    return F.normalize(torch.cat(parts, dim=1), dim=1)


def forward_rate(
    embedder: Embedder, batch: int, dtype: torch.dtype | None, seconds: float, channels_last: bool = False
) -> tuple[float, torch.Tensor]:
    """Images/s of the bare forward on a fixed batch already on the device (autocast to
    ``dtype``; None: fp32), and its vectors."""
    device = embedder.device
    size = embedder.config.image_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), autocast:
        out = _vectors(embedder, x)  # warm-up (and cudnn's choice of kernels)
        sync()
        start, runs = time.perf_counter(), 0
        while runs < 2 or time.perf_counter() - start < seconds:
            out = _vectors(embedder, x)
            runs += 1
            sync()
        elapsed = time.perf_counter() - start
    return runs * batch / elapsed, out.float().cpu()


def forward_rates(embedder: Embedder, sizes: Sizes, gpu: bool) -> dict[str, Any]:
    """The bare forward at batch 32 and 128 in fp32 and (GPU) bf16 / fp16 autocast, fp16
    with channels_last too, and each half precision's worst cosine to fp32."""
    rates: dict[str, Any] = {}
    dtypes: dict[str, torch.dtype | None] = {"fp32": None}
    if gpu:
        dtypes.update(bf16=torch.bfloat16, fp16=torch.float16)
    for batch in (32, 128) if gpu else (8,):
        reference = None
        for name, dtype in dtypes.items():
            rate, vectors = forward_rate(embedder, batch, dtype, sizes.forward_seconds)
            rates[f"fwd_{name}_b{batch}"] = rate
            if reference is None:
                reference = vectors
            else:  # the worst row, at any batch
                cos = float((vectors * reference).sum(dim=1).min())
                rates[f"cos_{name}_vs_fp32"] = min(cos, rates.get(f"cos_{name}_vs_fp32", 1.0))
    if gpu:
        try:
            channels_last = copy.copy(embedder)
            channels_last.backbone = copy.deepcopy(embedder.backbone)
            cast(torch.nn.Module, channels_last.backbone).to(memory_format=torch.channels_last)  # in place
            rate = forward_rate(channels_last, 128, torch.float16, sizes.forward_seconds, channels_last=True)[0]
            rates["fwd_fp16_channels_last_b128"] = rate
        except (RuntimeError, TypeError) as exc:
            rates["fwd_fp16_channels_last_b128"] = f"error: {exc}"[:80]
    return rates


def check_ingest(sizes: Sizes, warm: list[Path], runs: dict[str, list[Path]], index_dir: Path, gpu: bool) -> Result:
    """Ingest ``warm`` (untimed: loads the model, fits the projection), then each of
    ``runs`` into the same index: "default" with the CLI's defaults (batch 32, the
    library's decoding workers), "tuned" (if given) with batch 64 and a worker per core."""
    numbers: dict[str, Any] = {"model": sizes.model}
    cores = os.cpu_count() or 1
    # tuned: a decoding worker per core (the default stops at 8), batch 64 (128 x 15 workers
    # x prefetch 4 would hold 6 GB of tensors in /dev/shm)
    settings = {"default": (32, sizes.workers), "tuned": (64, max(1, cores - 1) if sizes.workers is None else sizes.workers)}
    missing = 0  # images rejected or not embedded
    with Engine.open(index_dir, model=sizes.model, create=True, device=sizes.device) as engine:
        embedder = engine.snapshot.embedder.get()
        autocast = embedder._autocast()
        numbers["autocast"] = str(autocast.fast_dtype).removeprefix("torch.") if autocast._enabled else "off (fp32)"
        report = engine.ingest(items(warm), batch_size=32, workers=sizes.workers, quiet=True)
        missing += len(warm) - report.embedded
        first = len(warm)
        for label, paths in runs.items():
            batch, workers = settings[label]
            start = time.perf_counter()
            report = engine.ingest(items(paths, first), batch_size=batch, workers=workers, quiet=True)
            wall = time.perf_counter() - start
            first += len(paths)
            missing += len(paths) - report.embedded
            numbers[f"{label}_img_s"] = report.images_per_s
            numbers[f"{label}_wall_img_s"] = report.embedded / wall  # with the save at the end
            numbers[f"{label}_batch"] = batch
            numbers[f"{label}_workers"] = default_workers(embedder.device) if workers is None else workers
        numbers["vectors"] = engine.info()["vectors"]
        numbers.update(forward_rates(embedder, sizes, gpu))
    numbers["not_embedded"] = missing
    rate = numbers.get("default_img_s", 0.0)
    ok = missing == 0 and (rate >= INGEST_TARGET or not gpu)
    note = f"default_img_s {rate:.0f} < {INGEST_TARGET:.0f}" if gpu and rate < INGEST_TARGET else ""
    if missing:
        note = f"{missing} images not embedded"
    if gpu and not ok and numbers.get("tuned_img_s", 0.0) >= INGEST_TARGET:
        note += " (the tuned settings reach it)"
    if not gpu and ok:
        note = "no GPU: rates are the tiny model's on the CPU"
    return Result("ingest_rate", verdict(ok, gpu), numbers, note)


# check 4: micro-batching --------------------------------------------------------------
def run_clients(service: SearchService, queries: list[bytes], clients: int, seconds: float, per_client: int) -> dict[str, Any]:
    """``clients`` threads each searching ``queries`` in turn, until ``seconds`` pass or
    each has done ``per_client``; queries/s over the whole run."""
    done, errors, first_error = [0] * clients, [0] * clients, [""]
    ready = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        ready.wait()
        deadline = time.perf_counter() + seconds
        while done[c] < per_client and time.perf_counter() < deadline:
            try:
                service.search(ImageQuery(queries[(c * 7 + done[c] + errors[c]) % len(queries)]), SearchOptions(k=K))
                done[c] += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
                errors[c] += 1
                first_error[0] = first_error[0] or f"{type(exc).__name__}: {exc}"
                if errors[c] > 100:
                    return

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {"qps": sum(done) / elapsed, "ok": sum(done), "errors": sum(errors), "first_error": first_error[0]}


def check_batching(sizes: Sizes, index_dir: Path, queries: list[bytes], gpu: bool) -> Result:
    """The same clients through the model queue with batch_max 1 and then the GPU default."""
    numbers: dict[str, Any] = {"clients": sizes.clients}
    errors = []
    with Engine.open(index_dir, device=sizes.device) as engine:
        for label, batch_max in (("off", 1), ("on", default_batch_max("cuda"))):
            batches: list[int] = []
            config = ServeConfig(index_dir=str(index_dir), batch_max=batch_max, reload_interval_s=0)
            service = SearchService(engine, config, on_batch=batches.append)
            try:
                service.warm_up()
                run_clients(service, queries, sizes.clients, sizes.client_seconds, 2)  # warm-up, not counted
                batches.clear()
                run = run_clients(service, queries, sizes.clients, sizes.client_seconds, sizes.client_queries)
            finally:
                service.close()
            numbers[f"{label}_batch_max"] = batch_max
            numbers[f"{label}_qps"] = run["qps"]
            numbers[f"{label}_mean_batch"] = float(np.mean(batches)) if batches else 0.0
            numbers[f"{label}_errors"] = run["errors"]
            if run["errors"] or not run["ok"]:
                errors.append(f"{label}: {run['errors']} errors, {run['ok']} answered ({run['first_error']})")
    numbers["ratio"] = numbers["on_qps"] / max(numbers["off_qps"], 1e-9)
    ok = not errors and (numbers["ratio"] >= BATCHING_TARGET or not gpu)
    note = "; ".join(errors) or ("" if ok else f"ratio {numbers['ratio']:.2f} < {BATCHING_TARGET}")
    if not gpu and ok:
        note = "no GPU: the ratio is the tiny model's on the CPU"
    return Result("batching", verdict(ok, gpu), numbers, note)


# the run ------------------------------------------------------------------------------
def check_environment(gpu: bool) -> Result:
    numbers: dict[str, Any] = {
        "faiss": faiss.__version__,
        "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
        "torch": torch.__version__,
        "torch_cuda": torch.cuda.is_available(),
        "cores": os.cpu_count() or 1,
    }
    with contextlib.suppress(OSError):  # decoded images travel to the model through shared memory
        numbers["shm_gb"] = shutil.disk_usage("/dev/shm").total / 2**30
    if torch.cuda.is_available():
        numbers["device"] = torch.cuda.get_device_name(0)
        numbers["bf16"] = torch.cuda.is_bf16_supported()
    if not gpu:
        return Result("env", "SKIP", numbers, "--cpu: small sizes, tiny model, no GPU")
    seen = gpu_available() and torch.cuda.is_available()
    note = "" if seen else "no GPU visible (faiss-gpu and a CUDA torch? `pip install -e .[gpu]`); --cpu runs the CPU paths"
    return Result("env", "PASS" if seen else "FAIL", numbers, note)


class Run:
    """The results so far, printed as they come and written to ``out`` after each; a
    watchdog (GPU run) ends the process past the budget, with what finished written down."""

    def __init__(self, mode: str, sizes: Sizes, out: Path | None, budget_s: float, watchdog: bool = True) -> None:
        self.mode, self.sizes, self.out, self.budget_s = mode, sizes, out, budget_s
        self.start = time.monotonic()
        self.results: list[Result] = []
        self.current = ""
        self._lock = threading.Lock()
        self._watchdog = threading.Timer(budget_s, self._expire)
        self._watchdog.daemon = True
        if watchdog:
            self._watchdog.start()

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def check(self, name: str, needs_s: float, fn: Callable[[], Result]) -> Result:
        """Run ``fn`` if the budget has ``needs_s`` left, else SKIP; an exception FAILs."""
        start = time.monotonic()
        if self.left() < needs_s:
            result = Result(name, "SKIP", note=f"not started: {self.left():.0f} s of the budget left, needs ~{needs_s:.0f}")
        else:
            self.current = name
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - one check's failure must not stop the others
                traceback.print_exc(file=sys.stderr)
                result = Result(name, "FAIL", note=f"error: {type(exc).__name__}: {exc}"[:300])
        result.seconds = time.monotonic() - start
        self.add(result)
        return result

    def add(self, result: Result) -> None:
        with self._lock:
            self.results.append(result)
            print(result.line(), flush=True)
            self._write()

    def finish(self) -> int:
        self._watchdog.cancel()
        with self._lock:
            self._write()
        failed = [r.name for r in self.results if r.status == "FAIL"]
        print(f"{'FAIL' if failed else 'ok'}: {len(self.results)} checks in {time.monotonic() - self.start:.0f} s" + (
            f", failed: {', '.join(failed)}" if failed else ""), flush=True)  # fmt: skip
        if self.out is not None:
            print(f"summary: {self.out}", flush=True)
        if any(r.name == "env" and r.status == "FAIL" for r in self.results):
            return 2
        return 1 if failed else 0

    def summary(self, expired: str = "") -> dict[str, Any]:
        return {
            "mode": self.mode,
            "ok": not any(r.status == "FAIL" for r in self.results) and not expired,
            "seconds": round(time.monotonic() - self.start, 1),
            "budget_s": self.budget_s,
            "expired_during": expired,
            "targets": {"ingest_img_s": INGEST_TARGET, "batching_ratio": BATCHING_TARGET, "ivf_train_recall_drop": 0.01},
            "sizes": asdict(self.sizes),
            "checks": [asdict(r) for r in self.results],
        }

    def _write(self, expired: str = "") -> None:
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.summary(expired), indent=2, default=str) + "\n")
        tmp.replace(self.out)

    def _expire(self) -> None:
        with self._lock:
            print(f"FAIL {self.current or 'run':12} past the {self.budget_s:.0f} s budget: stopped", flush=True)
            self._write(expired=self.current or "run")
        os._exit(3)


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vsearch-gpu-check-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}", flush=True)
        else:
            shutil.rmtree(path, ignore_errors=True)


def default_out() -> Path | None:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check.json" if out else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--cpu", action="store_true", help="small sizes on the CPU with the tiny test model")
    parser.add_argument("--out", type=Path, default=default_out(), help="JSON summary (default: $OUT/gpu_check.json)")
    parser.add_argument("--budget-s", type=float, default=280.0, help="stop past this many seconds (default 280)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary images and index")
    args = parser.parse_args(argv)
    gpu = not args.cpu
    sizes = GPU if gpu else CPU
    run = Run("gpu" if gpu else "cpu", sizes, args.out, args.budget_s, watchdog=gpu)  # not inside the tests
    if run.check("env", 0, lambda: check_environment(gpu)).status == "FAIL":
        return run.finish()
    with workspace(args.keep) as tmp:
        runs = ("default", "tuned") if gpu else ("default",)
        paths: list[Path] = []

        def images() -> Result:  # forked writers, which touch no CUDA
            n = sizes.warm_images + len(runs) * sizes.images
            paths.extend(write_images(tmp / "images", n, sizes.image_size, sizes.processes))
            kb = np.mean([p.stat().st_size for p in paths[:200]]) / 1024
            return Result("images", "PASS", {"n": len(paths), "size": "x".join(map(str, sizes.image_size)), "mean_kb": kb})

        run.check("images", 20, images)
        run.check("search_equal", 30, lambda: check_search(sizes, gpu_mirror if gpu else copy_index, gpu))
        trainer = gpu_trainer if gpu else cpu_stand_in
        run.check("ivf_train", 30, lambda: check_ivf_training(sizes, trainer(sizes.dim), gpu))
        warm = paths[: sizes.warm_images]
        parts = {label: paths[sizes.warm_images + i * sizes.images :][: sizes.images] for i, label in enumerate(runs)}
        index_dir = tmp / "index"
        run.check("ingest_rate", 40, lambda: check_ingest(sizes, warm, parts, index_dir, gpu))
        queries = [p.read_bytes() for p in warm[:64]]
        if (index_dir / "manifest.json").exists():
            run.check("batching", 2 * sizes.client_seconds + 15, lambda: check_batching(sizes, index_dir, queries, gpu))
        else:
            run.add(Result("batching", "SKIP", note="no index: ingest_rate did not build one"))
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())

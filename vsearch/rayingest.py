"""Ingestion on Ray (``vsearch ingest SOURCE --ray [ADDRESS]``): decoding and embedding
run as a Ray Data ``map_batches`` over an actor pool, one model per actor; the vectors
come back to this process, are written as Parquet shards in the ``vsearch import``
format (:mod:`vsearch.bulkimport`), and are stored through the single writer
(:func:`vsearch.bulkimport.import_shards`).

The result is the catalog and index :func:`vsearch.ingest.ingest` builds from the same
source: the same rows are kept, merged and rejected (the same helpers decide), the same
vectors (up to float rounding: actors embed other batches), the same image ids (the
pipeline preserves the source's order), the same ``rejects.jsonl`` and report.

* **Incremental.** Each row carries the content hash the catalog knows; the actor
  reads and hashes the file and skips decoding and embedding when it matches, as the
  in-process loader does. A known URL is not fetched again.
* **Resumable.** Shards are written, atomically, to ``DIR/ray-shards/<version>-<key>/``
  (``key``: a hash of the source's path, or of its rows, and of the model), every
  :data:`SHARD_ROWS` vectors or :data:`FLUSH_EVERY_S` seconds, by this process: on a
  cluster the workers need not see ``DIR``. A run that dies after embedding (in the
  pipeline or in the import) leaves its shards; the next run of the same source hands
  each image the hash its shard row recorded, so an unchanged file is not embedded
  again and its row is imported from the old shard. Rows whose file changed or left the
  source are dropped from the old shards first. The folder is removed once imported
  (``keep_shards`` keeps it; the shards import into any index of the same model).
* **Where the work runs.** ``address`` None (or ``"local"``) starts a private local
  Ray with ``num_cpus`` CPUs for this run and stops it afterwards; ``"auto"`` joins the
  cluster ``ray start`` made on this machine, ``ray://HOST:10001`` a remote one (Ray
  client). An already initialised Ray (``ray.init`` by the caller) is used as is.
  Actors get ``num_gpus=1`` each where the cluster has GPUs (one actor per GPU; images
  are then decoded by CPU tasks in a stage of their own), otherwise ``cpus_per_actor``
  CPUs each and decode their own batches. Workers must be able to import vsearch and
  read the images (a shared mount, or URLs); a fine-tuned version's folder and a model
  checkpoint path must be readable there too.

Ray is optional (``pip install 'vsearch[ray]'``) and imported only when a run starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .bulkimport import META_MODEL, META_VERSION, RESERVED, import_shards
from .catalog import BASE_MODEL
from .errors import ConfigError, IndexBusyError, StorageError
from .fsutil import atomic_write, atomic_write_bytes
from .ingest import IngestReport, Reject, _storable, _unique, _update_known_products, _work, merge_products
from .sources import Item, read_source_items

if TYPE_CHECKING:
    from .embed import Embedder, LoadedImage
    from .engine import Engine

__all__ = ["FLUSH_EVERY_S", "RUNS_DIR", "SHARD_ROWS", "RayIngestReport", "init_args", "ray_ingest", "require_ray"]

_log = logging.getLogger(__name__)

RUNS_DIR = "ray-shards"
SHARD_ROWS = 4096  # vectors per shard (about 20 MB at 1280 floats)
FLUSH_EVERY_S = 30.0  # ... or what came back in this many seconds: a crash loses at most that
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2  # only paths go in and vectors come out: images stay in the actors
EMBEDDED, UNCHANGED, FAILED = "embedded", "unchanged", "error"


@dataclass
class RayIngestReport(IngestReport):
    """:class:`IngestReport` plus where the time went on Ray."""

    address: str = "local"
    actors: int = 0
    gpus_per_actor: float = 0.0
    decode: str = ""  # "actors" (each actor decodes its batches) or "tasks" (a CPU stage of its own)
    computed: int = 0  # vectors the actors computed in this run
    reused: int = 0  # vectors taken from an interrupted run's shards instead
    shards_dir: str = ""
    ray_start_s: float = 0.0  # ray.init: starting a local Ray, or connecting
    first_result_s: float = 0.0  # pipeline start -> first vectors back (actors started, models loaded)
    pipeline_s: float = 0.0  # pipeline start -> last result
    steady_rows: int = 0  # rows that came back after the first result
    import_s: float = 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Rows (embedded or hashed) per second once the first result was back."""
        span = self.pipeline_s - self.first_result_s
        return self.steady_rows / span if span > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            **super().to_dict(),
            "ray": {
                "address": self.address,
                "actors": self.actors,
                "gpus_per_actor": self.gpus_per_actor,
                "decode": self.decode,
                "computed": self.computed,
                "reused": self.reused,
                "shards_dir": self.shards_dir,
                "ray_start_s": round(self.ray_start_s, 3),
                "first_result_s": round(self.first_result_s, 3),
                "pipeline_s": round(self.pipeline_s, 3),
                "steady_images_per_s": round(self.steady_images_per_s, 2),
                "import_s": round(self.import_s, 3),
            },
        }


def ray_ingest(
    engine: Engine,
    source: str | os.PathLike[str] | Sequence[Item],
    *,
    address: str | None = None,
    actors: int | None = None,
    num_cpus: int | None = None,
    cpus_per_actor: int = 1,
    device: str | None = None,
    decode: str | None = None,
    batch_size: int = 32,
    prune: bool = False,
    center_on: str | os.PathLike[str] | None = None,
    keep_shards: bool = False,
    quiet: bool = False,
) -> RayIngestReport:
    """:func:`vsearch.ingest.ingest` with decoding and embedding on Ray (module docstring).

    ``actors``: model replicas (default: one per GPU, else one per ``cpus_per_actor``
    CPUs of the cluster); ``num_cpus``: CPUs of a local Ray started for this run
    (default: all); ``device``: ``"cpu"`` keeps the actors off GPUs, ``"cuda"``
    requires them; ``decode``: ``"actors"`` or ``"tasks"`` (default: tasks with GPUs).
    """
    if cpus_per_actor < 1 or batch_size < 1 or (actors is not None and actors < 1):
        raise ConfigError("actors, cpus_per_actor and batch_size must be at least 1")
    if decode not in (None, "actors", "tasks"):
        raise ConfigError(f"decode must be 'actors' or 'tasks', not {decode!r}")
    ray = require_ray()
    pa = _pyarrow()
    start = time.perf_counter()
    items = read_source_items(source) if isinstance(source, (str, os.PathLike)) else list(source)
    report = RayIngestReport(items=len(items), address=address or "local")
    ordered = _unique(_storable(items, report), report)
    products = merge_products(ordered, report)
    with engine.writer() as writer:
        pending = _update_known_products(engine, writer, products)
        work = _work(engine, ordered, report)  # (n, source, catalog sha256)

    run_dir = _run_dir(engine, source, ordered)
    report.shards_dir = str(run_dir)
    with _run_lock(run_dir):
        try:
            old = _old_shards(pa, run_dir)
            first_new = _next_number(run_dir)
            columns = _Columns(pa, engine, ordered, products)
            verified: set[tuple[str, str, str]] = set()
            if work:
                run = _Run(ray, engine, ordered, report, old, _Shards(pa, run_dir, columns))
                plan = (actors, cpus_per_actor, device, decode)
                run.embed(work, address=address, num_cpus=num_cpus, plan_args=plan, batch_size=batch_size, quiet=quiet)
                verified = run.verified
            report.reused = _keep_verified(pa, run_dir, verified, first_new) if old else 0
            _store(engine, run_dir, report, ordered, products, pending, lossy=columns.lossy, prune=prune, quiet=quiet)
            report.seconds = time.perf_counter() - start
            with engine.writer() as writer:
                if center_on is not None:
                    engine.fit_projection(center_on)
                elif prune or not report.embedded:
                    writer.finish()  # otherwise import_shards finished its own writes
        except BaseException:
            if not any(run_dir.glob("shard-*.parquet")):
                _remove(run_dir)  # nothing to resume from
            raise
        if not keep_shards:
            _remove(run_dir)
    return report


def _store(
    engine: Engine,
    run_dir: Path,
    report: RayIngestReport,
    ordered: list[Item],
    products: dict[str, Item],
    pending: set[str],
    *,
    lossy: bool,
    prune: bool,
    quiet: bool,
) -> None:
    """Import the run's shards through the single writer, then what the in-process
    ingest does after its last batch: product fields the shards could not carry,
    products left out, the prune and ``rejects.jsonl``."""
    t = time.perf_counter()
    files = sorted(run_dir.glob("shard-*.parquet"))
    if files:
        imported = import_shards(engine, files, quiet=quiet)
        report.embedded += imported.added
        report.unchanged += imported.unchanged
        report.rejected += [Reject(r.product_id, r.source, r.reason) for r in imported.rejected]
    report.import_s = time.perf_counter() - t
    with engine.writer() as writer:
        if lossy:
            writer.upsert_products([p for p in products.values() if engine.catalog.images_of(p.product_id)])
        report.products_skipped = sorted(pid for pid in pending if not engine.catalog.images_of(pid))
        if prune:
            report.removed_products, report.removed_image_ids = writer.prune({(i.product_id, i.image) for i in ordered})
            report.removed_images = len(report.removed_image_ids)
        lines = "".join(json.dumps(r.__dict__) + "\n" for r in report.rejected)
        atomic_write_bytes(engine.paths.rejects, lines.encode())


def _remove(run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        run_dir.parent.rmdir()  # only when no other run's shards are left


class _Run:
    """One pass of the work over Ray: results sorted into rejects, unchanged rows, rows
    an old shard holds (``verified``) and new vectors (``shards``)."""

    def __init__(
        self,
        ray: Any,
        engine: Engine,
        ordered: list[Item],
        report: RayIngestReport,
        old: dict[tuple[str, str], str],
        shards: _Shards,
    ) -> None:
        self.ray, self.engine, self.ordered, self.report, self.old, self.shards = ray, engine, ordered, report, old, shards
        self.verified: set[tuple[str, str, str]] = set()
        self.from_shard: set[int] = set()  # rows an old shard holds a vector for
        self.stored: dict[int, str] = {}  # row -> the sha256 the catalog has ("" for none)

    def embed(
        self,
        work: Sequence[tuple[object, str, str]],
        *,
        address: str | None,
        num_cpus: int | None,
        plan_args: tuple[int | None, int, str | None, str | None],
        batch_size: int,
        quiet: bool,
    ) -> None:
        ray, report, pa = self.ray, self.report, self.shards.pa
        known = []
        for key, src, sha in work:
            n = int(key)  # type: ignore[call-overload]
            self.stored[n] = sha
            shard_sha = self.old.get((self.ordered[n].product_id, src))
            if shard_sha is not None:
                self.from_shard.add(n)  # embedded by an interrupted run: skipped if the file still matches
            known.append(shard_sha if shard_sha is not None else sha)
        rows = pa.table(
            {
                "n": pa.array([int(n) for n, _, _ in work], pa.int64()),  # type: ignore[call-overload]
                "source": pa.array([src for _, src, _ in work], pa.string()),
                "known": pa.array(known, pa.string()),
            }
        )
        t = time.perf_counter()
        started = _connect(ray, address, num_cpus, quiet)
        report.ray_start_s = time.perf_counter() - t
        try:
            plan = _plan(ray, *plan_args)
            report.actors, report.gpus_per_actor, report.decode = plan.actors, plan.gpus, plan.decode
            t = time.perf_counter()
            results = contextlib.closing(_pipeline(ray, rows, _model_spec(self.engine), plan, batch_size, quiet))
            with results as batches:  # closed at once on an interruption: the actors go
                self._collect(batches, t)
            report.pipeline_s = time.perf_counter() - t
            self.shards.flush()
        except BaseException:
            with contextlib.suppress(Exception):
                self.shards.flush()  # what came back before the interruption is kept
            raise
        finally:
            if started:
                ray.shutdown()

    def _collect(self, batches: Iterator[dict[str, Any]], t: float) -> None:
        report = self.report
        for batch in batches:
            if not report.first_result_s:
                report.first_result_s = time.perf_counter() - t
            else:
                report.steady_rows += len(batch["n"])
            self._take(batch)

    def _take(self, batch: dict[str, Any]) -> None:
        report = self.report
        for i, n in enumerate(batch["n"].tolist()):
            item, status = self.ordered[n], str(batch["status"][i])
            if status == FAILED:
                report.rejected.append(Reject(item.product_id, item.image, str(batch["error"][i])))
            elif status == UNCHANGED and n in self.from_shard and batch["sha256"][i] != self.stored[n]:
                self.verified.add((item.product_id, item.image, str(batch["sha256"][i])))  # imported from that shard
            elif status == UNCHANGED:
                report.unchanged += 1  # the catalog has this content already
        done = batch["status"] == EMBEDDED
        if done.any():
            self.shards.add(*(batch[c][done] for c in ("n", "sha256", "width", "height", "vector")))
            report.computed += int(done.sum())


# Ray -----------------------------------------------------------------------------------
def require_ray() -> Any:
    """The ``ray`` module (with Ray Data), or a ConfigError saying what to install."""
    try:
        import ray
        import ray.data  # noqa: F401 - loads ray.data
    except ImportError:
        raise ConfigError("ingest --ray needs Ray: pip install 'vsearch[ray]'") from None
    return ray


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401 - loads pa.parquet
    except ImportError:
        raise ConfigError("ingest --ray needs pyarrow: pip install 'vsearch[ray]'") from None
    return pa


def init_args(address: str | None, num_cpus: int | None, quiet: bool = False) -> dict[str, Any]:
    """``ray.init`` keyword arguments: a private local Ray for None or ``"local"``,
    otherwise a connection to ``address`` (``"auto"``, ``HOST:PORT``, ``ray://HOST:PORT``)."""
    common: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": not quiet}
    if address in (None, "", "local"):
        cpus = num_cpus if num_cpus is not None else os.cpu_count() or 1
        return {
            "address": "local",
            "num_cpus": cpus,
            "include_dashboard": False,
            "object_store_memory": LOCAL_OBJECT_STORE_BYTES,
            **common,
        }
    if num_cpus is not None:
        raise ConfigError("--ray-cpus sizes a local Ray; a cluster has the CPUs its nodes started with")
    return {"address": address, **common}


def _connect(ray: Any, address: str | None, num_cpus: int | None, quiet: bool) -> bool:
    """Start or join Ray; True when this call started it (and must stop it)."""
    if ray.is_initialized():
        return False
    kwargs = init_args(address, num_cpus, quiet)
    try:
        ray.init(**kwargs)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
        where = "a local Ray" if kwargs["address"] == "local" else f"the Ray cluster at {address}"
        raise ConfigError(f"cannot start or reach {where}: {exc}") from None
    return True


@dataclass(frozen=True)
class _Plan:
    actors: int
    cpus: float  # per actor
    gpus: float  # per actor
    decode: str  # "actors" | "tasks"


def _plan(ray: Any, actors: int | None, cpus_per_actor: int, device: str | None, decode: str | None) -> _Plan:
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if device is not None and device.startswith("cuda") and not gpus:
        raise ConfigError("--device cuda, but the Ray cluster has no GPUs")
    if gpus and (device is None or device.startswith("cuda")):
        return _Plan(actors or gpus, 1, 1, decode or "tasks")
    if cpus < cpus_per_actor:
        raise ConfigError(f"the Ray cluster has {cpus} CPUs; an actor needs {cpus_per_actor}")
    decode = decode or "actors"
    spare = 1 if decode == "tasks" else 0  # decoding tasks need a CPU of their own
    return _Plan(actors or max(1, (cpus - spare) // cpus_per_actor), cpus_per_actor, 0, decode)


def _model_spec(engine: Engine) -> dict[str, Any]:
    """What an actor needs to build the served version's embedder (plain data)."""
    from .versions import version_dir

    spec: dict[str, Any] = {"model": engine.manifest.model.to_dict(), "version": engine.active, "folder": ""}
    if engine.active != BASE_MODEL:
        spec["folder"] = str(version_dir(engine.paths.root, engine.active))
    return spec


def _pipeline(
    ray: Any, rows: Any, spec: dict[str, Any], plan: _Plan, batch_size: int, quiet: bool
) -> Generator[dict[str, Any], None, None]:
    """The Ray Data pipeline's results, a block at a time, in the order of ``rows``."""
    context = ray.data.DataContext.get_current()
    saved = context.execution_options.preserve_order, context.enable_progress_bars
    context.execution_options.preserve_order = True  # image ids as an in-process ingest gives them
    context.enable_progress_bars = not quiet and sys.stderr.isatty()
    data_log = logging.getLogger("ray.data")
    level = data_log.level
    if quiet:
        data_log.setLevel(logging.WARNING)
    try:
        ds = ray.data.from_arrow(_blocks(rows, batch_size, plan.actors))
        embed_kwargs: dict[str, Any] = {
            "spec": spec,
            "device": "cuda" if plan.gpus else "cpu",
            "threads": int(plan.cpus),
            "decode": plan.decode == "actors",
        }
        if plan.decode == "tasks":
            ds = ds.map_batches(
                _decode_batch, fn_kwargs={"model": spec["model"]}, batch_size=batch_size, batch_format="numpy", num_cpus=1
            )
        ds = ds.map_batches(
            _EmbedActor,
            fn_constructor_kwargs=embed_kwargs,
            compute=ray.data.ActorPoolStrategy(size=plan.actors),
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=plan.cpus,
            num_gpus=plan.gpus,
        )
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        data_log.setLevel(level)


def _blocks(rows: Any, batch_size: int, actors: int) -> list[Any]:
    """``rows`` cut into blocks (what one actor call receives) of whole batches: up to
    8 batches each, fewer where that leaves under 4 blocks per actor to share out."""
    batches = -(-rows.num_rows // batch_size)
    per_block = max(1, min(8, batches // (4 * actors)))
    size = per_block * batch_size
    return [rows.slice(i, size) for i in range(0, rows.num_rows, size)]


# What runs on the workers ---------------------------------------------------------------
def _decode_batch(batch: dict[str, np.ndarray], model: dict[str, Any]) -> dict[str, Any]:
    """Read, hash, decode and prepare a batch (a CPU task): ``tensor`` is the model's
    input, empty for rows that are unchanged or unreadable."""
    from .config import ModelConfig
    from .embed import Preprocess

    loaded = _load(batch, Preprocess(ModelConfig.from_dict(model)))
    out = _columns(loaded)
    out["tensor"] = [x.tensor.numpy() if x.tensor is not None else np.zeros((0, 0, 0), np.float32) for x in loaded]
    return out


class _EmbedActor:
    """One model per actor, loaded once; embeds a batch (decoding it first, unless a
    decoding stage did)."""

    def __init__(self, spec: dict[str, Any], device: str, threads: int, decode: bool) -> None:
        import torch

        from .config import ModelConfig
        from .embed import Preprocess

        torch.set_num_threads(max(1, threads))
        self.embedder = _load_embedder(spec, device)
        self.preprocess = Preprocess(ModelConfig.from_dict(spec["model"]))  # as the in-process ingest prepares images
        self.decode = decode

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        if self.decode:
            loaded = _load(batch, self.preprocess)
            out = _columns(loaded)
            tensors = [x.tensor for x in loaded]
        else:
            out = {k: batch[k] for k in ("n", "sha256", "width", "height", "status", "error")}
            tensors = [  # a copy: the batch may be a read-only view of Ray's object store
                torch.from_numpy(np.array(t, dtype=np.float32)) if out["status"][i] == EMBEDDED else None
                for i, t in enumerate(batch["tensor"])
            ]
        todo = [i for i, status in enumerate(out["status"]) if status == EMBEDDED]
        vectors = np.zeros((len(out["n"]), self.embedder.dim), dtype=np.float32)
        if todo:
            stack = torch.stack([tensors[i] for i in todo])  # type: ignore[misc]
            vectors[todo] = self.embedder.embed_tensor(stack)
        out["vector"] = vectors
        return out


def _load_embedder(spec: dict[str, Any], device: str) -> Embedder:
    """The served version's embedder on this worker (``device``: "cuda" on the GPU Ray
    gave the actor, else "cpu")."""
    from .config import ModelConfig
    from .embed import Embedder

    if spec["folder"]:
        from .adapter import AdaptedEmbedder

        return AdaptedEmbedder(Path(spec["folder"]), device=device)
    return Embedder(ModelConfig.from_dict(spec["model"]), device=device)


def _load(batch: dict[str, np.ndarray], preprocess: Any) -> list[LoadedImage]:
    """The in-process loader's read -> hash -> decode -> prepare, on this worker."""
    from .embed import load_images

    work = [(int(n), str(s), str(k)) for n, s, k in zip(batch["n"], batch["source"], batch["known"])]
    return [x for part in load_images(work, preprocess, batch_size=max(1, len(work)), workers=0) for x in part]


def _columns(loaded: list[LoadedImage]) -> dict[str, Any]:
    def status(x: LoadedImage) -> str:
        return FAILED if x.error or (x.tensor is None and not x.unchanged) else UNCHANGED if x.unchanged else EMBEDDED

    return {
        "n": np.array([int(x.key) for x in loaded], dtype=np.int64),  # type: ignore[call-overload]
        "sha256": np.array([x.sha256 for x in loaded], dtype=object),
        "width": np.array([x.width for x in loaded], dtype=np.int32),
        "height": np.array([x.height for x in loaded], dtype=np.int32),
        "status": np.array([status(x) for x in loaded], dtype=object),
        "error": np.array([x.error or ("unreadable" if status(x) == FAILED else "") for x in loaded], dtype=object),
    }


# Shards --------------------------------------------------------------------------------
class _Columns:
    """How rows become shard columns: ``vsearch import``'s format, each row with its
    product's merged fields, and the index's model in the metadata."""

    def __init__(self, pa: Any, engine: Engine, ordered: list[Item], products: dict[str, Item]) -> None:
        self.pa, self.ordered, self.products = pa, ordered, products
        given = [p.attributes for p in products.values()]
        keys = sorted({k for a in given for k in (a or {})})
        # A null cell means "not given", so a product whose rows give no attributes at
        # all (keep the catalog's) cannot sit beside ones that do: then the shards carry
        # none, and the products get them from the source after the import.
        self.lossy = bool(keys) and (any(a is None for a in given) or any(k in RESERVED for k in keys))
        keys = [] if self.lossy else keys
        self.attributes = {k: self._kind([(a or {}).get(k) for a in given]) for k in keys}
        fields = [
            ("id", pa.string()),
            ("image", pa.string()),
            ("sha256", pa.string()),
            ("vector", pa.list_(pa.float32())),
            ("category", pa.string()),
            ("title", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            *self.attributes.items(),
        ]
        meta = {META_MODEL: engine.manifest.model.name.encode(), META_VERSION: engine.active.encode()}
        self.schema = pa.schema(fields, metadata=meta)

    def _kind(self, values: list[Any]) -> Any:
        pa = self.pa
        seen = {type(v) for v in values} - {type(None)}
        if seen == {bool}:
            return pa.bool_()
        if seen == {int}:
            return pa.int64()
        if seen and seen <= {int, float}:
            return pa.float64()
        if seen - {str}:
            self.lossy = True  # stored as JSON text by the import; the source's values are put back after it
        return pa.string()

    def table(self, ns: np.ndarray, sha256: np.ndarray, width: np.ndarray, height: np.ndarray, vectors: np.ndarray) -> Any:
        pa = self.pa
        items = [self.ordered[int(n)] for n in ns]
        merged = [self.products[i.product_id] for i in items]
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(items), -1)
        offsets = np.arange(0, vectors.size + 1, max(1, vectors.shape[1]), dtype=np.int32)[: len(items) + 1]
        data = {
            "id": [i.product_id for i in items],
            "image": [i.image for i in items],
            "sha256": [str(s) for s in sha256],
            "category": [p.category for p in merged],
            "title": [p.title for p in merged],
            "width": [int(w) for w in width],
            "height": [int(h) for h in height],
        }
        for key, kind in self.attributes.items():
            values = [(p.attributes or {}).get(key) for p in merged]
            if kind == pa.string():
                values = [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values]
            data[key] = values
        arrays = {name: pa.array(values, type=self.schema.field(name).type) for name, values in data.items()}
        arrays["vector"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(vectors.ravel()))
        return pa.Table.from_arrays([arrays[name] for name in self.schema.names], schema=self.schema)


class _Shards:
    """Vectors as they come back, written as numbered shards every SHARD_ROWS rows or
    FLUSH_EVERY_S seconds (a temporary name, then a rename: a shard is whole or absent)."""

    def __init__(self, pa: Any, folder: Path, columns: _Columns) -> None:
        self.pa, self.folder, self.columns = pa, folder, columns
        self.next = _next_number(folder)
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.rows = 0
        self.last = time.monotonic()

    def add(self, *part: np.ndarray) -> None:
        self.parts.append(part)
        self.rows += len(part[0])
        if self.rows >= SHARD_ROWS or time.monotonic() - self.last >= FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        joined = [np.concatenate(column) for column in zip(*self.parts)]
        table = self.columns.table(*joined)
        _write_shard(self.pa, self.folder / f"shard-{self.next:06d}.parquet", table)
        self.next += 1
        self.parts, self.rows, self.last = [], 0, time.monotonic()


def _next_number(folder: Path) -> int:
    return max((int(p.stem.split("-")[1]) for p in folder.glob("shard-*.parquet")), default=-1) + 1


def _write_shard(pa: Any, path: Path, table: Any) -> None:
    try:
        atomic_write(path, lambda tmp: pa.parquet.write_table(table, tmp))
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None


def _run_dir(engine: Engine, source: str | os.PathLike[str] | Sequence[Item], ordered: list[Item]) -> Path:
    """``DIR/ray-shards/<version>-<key>``: the same for every run of one source with
    one model, so a re-run finds what an interrupted one left."""
    if isinstance(source, (str, os.PathLike)):
        what = str(Path(source).resolve())
    else:
        what = hashlib.sha256("\n".join(f"{i.product_id}\t{i.image}" for i in ordered).encode()).hexdigest()
    model = json.dumps({"source": what, "model": engine.manifest.model.to_dict(), "version": engine.active}, sort_keys=True)
    key = hashlib.sha256(model.encode()).hexdigest()[:16]
    folder = engine.paths.root / RUNS_DIR / f"{engine.active}-{key}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "run.json").write_text(
            json.dumps({"source": what, "model": engine.manifest.model.name, "version": engine.active})
        )
    except OSError as exc:
        raise StorageError(f"cannot write {folder}: {exc.strerror or exc}") from None
    return folder


@contextlib.contextmanager
def _run_lock(folder: Path) -> Iterator[None]:
    """One run per shard folder at a time (an flock the kernel drops if we die)."""
    folder.mkdir(parents=True, exist_ok=True)  # again: a run that just finished removes it
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexBusyError(f"another `vsearch ingest --ray` of this source is writing {folder}; let it finish") from None
        yield
    finally:
        os.close(fd)


def _old_shards(pa: Any, folder: Path) -> dict[tuple[str, str], str]:
    """(product id, image) -> sha256 of the rows an interrupted run left (the newest
    shard's row where several have one); unreadable shards are set aside."""
    rows: dict[tuple[str, str], str] = {}
    for path in sorted(folder.glob("shard-*.parquet")):
        try:
            table = pa.parquet.read_table(path, columns=["id", "image", "sha256"])
        except (OSError, pa.ArrowException) as exc:
            _log.warning("vsearch: ignoring unreadable shard %s: %s", path, exc)
            with contextlib.suppress(OSError):
                path.rename(path.with_name(f"{path.name}.damaged"))
            continue
        for pid, image, sha in zip(*(table.column(c).to_pylist() for c in ("id", "image", "sha256"))):
            rows[(pid, image)] = sha
    return rows


def _keep_verified(pa: Any, folder: Path, verified: set[tuple[str, str, str]], below: int) -> int:
    """Cut the shards an interrupted run left (numbered below ``below``) down to the
    rows this run found unchanged: the file still has the hash the row records. Returns
    how many rows are left to import."""
    kept = 0
    for path in sorted(folder.glob("shard-*.parquet")):
        if int(path.stem.split("-")[1]) >= below:
            continue
        table = pa.parquet.read_table(path)
        keys = zip(*(table.column(c).to_pylist() for c in ("id", "image", "sha256")))
        mask = [key in verified for key in keys]
        kept += sum(mask)
        if all(mask):
            continue
        if any(mask):
            _write_shard(pa, path, table.filter(pa.array(mask)))
        else:
            path.unlink()
    return kept

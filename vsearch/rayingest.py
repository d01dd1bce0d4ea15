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
What runs on the workers is :mod:`vsearch.raywork`; the shards are :mod:`vsearch.rayshards`.
"""

from __future__ import annotations

import contextlib
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

from .bulkimport import import_shards
from .catalog import BASE_MODEL
from .errors import ConfigError
from .fsutil import atomic_write_bytes
from .ingest import IngestReport, Reject, merge_products, storable_items, unique_items, update_known_products, work_list
from .rayshards import Columns, Shards, keep_verified, next_number, old_shards, run_dir, run_lock
from .raywork import EMBEDDED, FAILED, UNCHANGED, EmbedActor, decode_batch
from .sources import Item, read_source_items

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["RayIngestReport", "init_args", "ray_ingest", "require_ray"]

LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2  # only paths go in and vectors come out: images stay in the actors


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
    ordered = unique_items(storable_items(items, report), report)
    products = merge_products(ordered, report)
    with engine.writer() as writer:
        pending = update_known_products(engine, writer, products)
        work = work_list(engine, ordered, report)  # (n, source, catalog sha256)

    folder = run_dir(engine, source, ordered)
    report.shards_dir = str(folder)
    with run_lock(folder):
        try:
            old = old_shards(pa, folder)
            first_new = next_number(folder)
            columns = Columns(pa, engine, ordered, products)
            verified: set[tuple[str, str, str]] = set()
            if work:
                run = _Run(ray, engine, ordered, report, old, Shards(pa, folder, columns))
                plan = (actors, cpus_per_actor, device, decode)
                run.embed(work, address=address, num_cpus=num_cpus, plan_args=plan, batch_size=batch_size, quiet=quiet)
                verified = run.verified
            report.reused = keep_verified(pa, folder, verified, first_new) if old else 0
            _store(engine, folder, report, ordered, products, pending, lossy=columns.lossy, prune=prune, quiet=quiet)
            report.seconds = time.perf_counter() - start
            with engine.writer() as writer:
                if center_on is not None:
                    engine.fit_projection(center_on)
                elif prune or not report.embedded:
                    writer.finish()  # otherwise import_shards finished its own writes
        except BaseException:
            if not any(folder.glob("shard-*.parquet")):
                _remove(folder)  # nothing to resume from
            raise
        if not keep_shards:
            _remove(folder)
    return report


def _store(
    engine: Engine,
    folder: Path,
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
    files = sorted(folder.glob("shard-*.parquet"))
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


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()  # only when no other run's shards are left


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
        shards: Shards,
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
            self.shards.add(*(batch[c][done] for c in ("n", "sha256", "width", "height", "phash", "vector")))
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
    data_log, bars_log = logging.getLogger("ray.data"), logging.getLogger("ray.data._internal.progress")
    levels = data_log.level, bars_log.level
    if quiet:
        data_log.setLevel(logging.WARNING)
    if not context.enable_progress_bars:
        bars_log.setLevel(logging.ERROR)  # not "progress bars disabled": we turned them off
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
                decode_batch, fn_kwargs={"model": spec["model"]}, batch_size=batch_size, batch_format="numpy", num_cpus=1
            )
        ds = ds.map_batches(
            EmbedActor,
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
        data_log.setLevel(levels[0])
        bars_log.setLevel(levels[1])


def _blocks(rows: Any, batch_size: int, actors: int) -> list[Any]:
    """``rows`` cut into blocks (what one actor call receives) of whole batches: up to
    8 batches each, fewer where that leaves under 4 blocks per actor to share out."""
    batches = -(-rows.num_rows // batch_size)
    per_block = max(1, min(8, batches // (4 * actors)))
    size = per_block * batch_size
    return [rows.slice(i, size) for i in range(0, rows.num_rows, size)]

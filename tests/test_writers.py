"""Several processes on one index directory: two writers and a reader, one writer
killed with SIGKILL midway. Every acknowledged write must end up in the catalog
and in the index, the reader must follow both writers, and nothing may be lost
for good (issue 9: a server and a CLI ingest on one directory lost 86 vectors)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

from vsearch import Engine
from vsearch.query import SearchOptions

from .conftest import make_image

MODEL = "tiny-test"
API_WRITES = 24
INGESTED = 48

# Both writers save slowly, as with a big catalog (at 1M images a save took 0.5 s and
# counting the catalog for the manifest 0.2 s): the window in which two
# unsynchronised saves interleave their index and manifest files.
SLOW_SAVE = """
import time
from vsearch.index import VectorIndex
_save = VectorIndex.save
def _slow_save(self, path):
    time.sleep(0.02)
    _save(self, path)
    time.sleep(0.02)
VectorIndex.save = _slow_save
"""

API_WRITER = (
    SLOW_SAVE
    + """
import sys
from vsearch import Engine
index, folder, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
with Engine.open(index) as engine:
    for i in range(start, {n}):
        engine.put_product(f"api{{i:03d}}", category="API", images=[f"{{folder}}/api{{i:03d}}.png"])
        print(i, flush=True)  # acknowledged: the call returned
"""
)

INGEST_WRITER = (
    SLOW_SAVE
    + """
import sys
from vsearch import Engine
from vsearch.sources import Item
index, folder, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
items = [Item(product_id=f"ing{{i:03d}}", image=f"{{folder}}/ing{{i:03d}}.png", category="Ingest") for i in range(n)]
with Engine.open(index) as engine:
    engine.ingest(items, batch_size=4, workers=0, quiet=True)
"""
)


def _images(folder: Path, prefix: str, n: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_image(seed + i, size=(40, 36)).save(folder / f"{prefix}{i:03d}.png")


def _start(script: str, *args: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    code = textwrap.dedent(script).format(n=API_WRITES)
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True, env=env)


def _assert_index_matches_catalog(engine: Engine) -> None:
    ids = np.array(sorted(i for ids in engine.catalog.category_image_ids().values() for i in ids), dtype=np.int64)
    index = engine.index
    assert index is not None
    assert index.ntotal == len(ids), f"{index.ntotal} vectors for {len(ids)} catalog images"
    stored = np.concatenate([raw for _, raw in engine.catalog.iter_vectors()])
    np.testing.assert_allclose(index.reconstruct(ids), engine.snapshot.projection.apply(stored), atol=1e-4)


def test_two_writer_processes_and_a_reader_with_a_kill(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    _images(folder, "api", API_WRITES, 1000)
    _images(folder, "ing", INGESTED, 2000)
    _images(tmp_path / "seed", "seed", 6, 3000)
    index = tmp_path / "index"
    with Engine.open(index, model=MODEL, create=True) as engine:
        engine.ingest(tmp_path / "seed", quiet=True, workers=0)

    reader = Engine.open(index)
    api = _start(API_WRITER, index, folder, 0)
    ingest = _start(INGEST_WRITER, index, folder, INGESTED)
    acked: list[int] = []
    assert api.stdout is not None
    while len(acked) < 6:  # let it acknowledge a few writes, then kill it mid-stream
        line = api.stdout.readline()
        assert line, "the API writer died on its own"
        acked.append(int(line))
    api.send_signal(signal.SIGKILL)
    api.wait()
    api = _start(API_WRITER, index, folder, acked[-1] + 1)  # what a restarted server's clients would retry

    errors: list[str] = []
    query = reader.embed_queries([make_image(1000)])
    while api.poll() is None or ingest.poll() is None:
        try:
            reader.refresh()
            reader.search_vectors(query, SearchOptions(k=5))
            reader.search_vectors(query, SearchOptions(k=5, categories=("API",)))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(exc))
        time.sleep(0.05)
    assert api.returncode == 0 and ingest.returncode == 0
    assert errors == []

    reader.refresh()  # the reader followed both writers, at the cost of their changes
    _assert_index_matches_catalog(reader)
    reader.close()
    with Engine.open(index) as engine:  # and a fresh open agrees
        products = engine.catalog.product_ids()
        assert {f"api{i:03d}" for i in range(API_WRITES)} <= products
        assert {f"ing{i:03d}" for i in range(INGESTED)} <= products
        assert engine.catalog.counts()["images"] == API_WRITES + INGESTED + 6
        _assert_index_matches_catalog(engine)
        for product in ("api000", f"api{acked[-1]:03d}", "ing000", f"ing{INGESTED - 1:03d}"):
            hit = engine.search_vectors(engine.product_vector(product), SearchOptions(k=1))[0][0]
            assert hit.product_id == product


def test_a_stale_process_saving_between_anothers_index_and_manifest_loses_nothing(tmp_path: Path) -> None:
    """The interleaving that lost vectors for good: process B writes its index file,
    process A (which has not seen B's writes) saves its own index and manifest, then
    B writes its manifest, which now vouches for A's index. Here A's save starts in
    exactly that gap; it must wait for B and catch up with B's writes first."""
    seed = tmp_path / "seed"
    _images(seed, "seed", 4, 0)
    _images(tmp_path / "new", "new", 3, 100)
    with Engine.open(tmp_path / "index", model=MODEL, create=True) as engine:
        engine.ingest(seed, quiet=True, workers=0)
    a, b = Engine.open(tmp_path / "index"), Engine.open(tmp_path / "index")

    def put(engine: Engine, name: str) -> None:
        engine.put_product(name, images=[str(tmp_path / "new" / f"{name}.png")])
        with engine.writer() as writer:
            writer.save()

    put(a, "new000")
    put(b, "new001")  # a has not seen this one
    counts = b.catalog.counts

    def a_saves_in_the_gap() -> dict[str, int]:  # b has written index.faiss, not yet its manifest
        other = threading.Thread(target=lambda: a.writer().__enter__().save())
        other.start()
        other.join(timeout=0.5)
        return counts()

    b.catalog.counts = a_saves_in_the_gap  # type: ignore[method-assign]
    put(b, "new002")
    b.catalog.counts = counts  # type: ignore[method-assign]
    b.close()
    time.sleep(0.5)
    a.close()
    with Engine.open(tmp_path / "index") as engine:
        assert engine.catalog.counts()["images"] == 7
        _assert_index_matches_catalog(engine)


KILLED_WRITER = (
    SLOW_SAVE
    + """
import sys
from vsearch import Engine
index, folder, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
with Engine.open(index) as engine:
    engine.checkpoint_every = 3  # saves are frequent, so kills land in them too
    for i in range(start, {n}):
        engine.put_product(f"api{{i:03d}}", category="API", images=[f"{{folder}}/api{{i:03d}}.png"])
        print(i, flush=True)
"""
)


def test_kill_9_in_a_loop_never_loses_an_acknowledged_write(tmp_path: Path) -> None:
    """Issue 10: reopen after kill -9 at any moment, with every acknowledged write present."""
    folder = tmp_path / "images"
    _images(folder, "api", API_WRITES, 1000)
    _images(tmp_path / "seed", "seed", 6, 3000)
    index = tmp_path / "index"
    with Engine.open(index, model=MODEL, create=True) as engine:
        engine.ingest(tmp_path / "seed", quiet=True, workers=0)
    rng = np.random.default_rng(7)
    acked: list[int] = []
    for _ in range(3):
        writer = _start(KILLED_WRITER, index, folder, acked[-1] + 1 if acked else 0)
        assert writer.stdout is not None
        for _ in range(int(rng.integers(2, 6))):
            line = writer.stdout.readline()
            assert line, "the writer died on its own"
            acked.append(int(line))
        time.sleep(float(rng.uniform(0, 0.2)))  # a random moment: mid-write, mid-save or idle
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        with Engine.open(index) as engine:
            products = engine.catalog.product_ids()
            assert {f"api{i:03d}" for i in acked} <= products
            _assert_index_matches_catalog(engine)
            last = f"api{acked[-1]:03d}"
            assert engine.search_vectors(engine.product_vector(last), SearchOptions(k=1))[0][0].product_id == last

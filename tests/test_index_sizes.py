"""Every index type ``choose_factory`` returns, at every size, against brute force.

Each factory (exact ``IDMap2,Flat``; ``IVF…,SQ8``, for every size past FLAT_MAX,
forced here on a small seeded Gaussian mixture rather than built from millions of
vectors) goes through many add batches, replacements, deletions and a save/load,
then is searched unfiltered and filtered (1%, 10%, 50% of the ids, drawn at random
and by cluster as categories are) against numpy's exact inner products on the same
vectors: exact factories match exactly, approximate ones reach recall@10 >= 0.95 at
the nprobe :meth:`VectorIndex.tune` picks against exact search. Filtered searches
also run between writes, so that what a filter keeps (its bitmap, its per-list
counts, the id -> list map) is checked as it is updated, not only as first built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pytest

from vsearch.categories import BlockCache
from vsearch.index import VectorIndex
from vsearch.ivflists import ListFilter, ListMap
from vsearch.projection import l2_normalize
from vsearch.sizing import FLAT_MAX, choose_factory, ivf_nlist, tune_nprobe
from vsearch.topk import recall_at_k

N, D, CLUSTERS, K = 20_000, 64, 100, 10
TARGET = 0.95


def mixture(n: int, seed: int, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``n`` L2-normalised points around ``centers``, and each one's cluster."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(centers), n)
    x = centers[labels] + rng.normal(scale=0.1, size=(n, centers.shape[1]))
    return l2_normalize(x.astype(np.float32)), labels


@dataclass
class World:
    ids: np.ndarray  # what the index holds, in the end
    xb: np.ndarray
    labels: np.ndarray
    xq: np.ndarray  # held-out queries from the same mixture


def factories() -> list[str]:
    """What choose_factory returns at each size band, with nlist fitted to N vectors."""
    nlist = ivf_nlist(N)
    out = sorted({re.sub(r"^IVF\d+", f"IVF{nlist}", choose_factory(n, D)) for n in (FLAT_MAX, FLAT_MAX + 1, 10**7, 10**9)})
    assert out == ["IDMap2,Flat", f"IVF{nlist},SQ8"], out
    return out


FACTORIES = factories()


def subsets(ids: np.ndarray, labels: np.ndarray, share: float) -> dict[str, dict[str, np.ndarray]]:
    """Blocks keeping ``share`` of ``ids``: at random, and whole clusters (categories)."""
    rng = np.random.default_rng(int(share * 1000))
    random_ids = np.sort(rng.choice(ids, max(1, round(share * len(ids))), replace=False))
    clusters = rng.permutation(CLUSTERS)[: max(1, round(share * CLUSTERS))]
    blocks = {f"c{c}": np.sort(ids[labels == c]) for c in clusters}
    return {"random": {"random": random_ids}, "clusters": blocks}


def check_filtered(index: VectorIndex, w: World, filters: dict[str, dict[str, np.ndarray]], target: float) -> None:
    """Filtered searches against brute force over what the index holds now."""
    for name, blocks in filters.items():
        allowed = np.concatenate(list(blocks.values()))
        D_, I_ = index.search(w.xq, K, blocks, BlockCache())
        assert np.isin(I_[I_ >= 0], allowed).all()
        mask = np.isin(w.ids, allowed)
        D_bf, I_bf = exact(w.xq, w.xb[mask], w.ids[mask], K)
        if index.nlist == 0:
            np.testing.assert_array_equal(I_, I_bf)
            continue
        recall = recall_at_k(I_, I_bf, K)
        assert recall >= target, f"{index.factory}, {name} between writes: recall@10 {recall:.3f}"


def assert_filters_current(index: VectorIndex) -> None:
    """What the index keeps of each filter, updated write by write, equals it built afresh."""
    lists = index.filtered.lists
    if lists is None:
        return
    fresh = ListMap.read(index.index, index.filtered.id_limit())
    assert fresh is not None and np.array_equal(lists.of[: len(fresh.of)], fresh.of) and (lists.of[len(fresh.of) :] == -1).all()
    for kept in index.filtered.filters.values():
        rebuilt = ListFilter.build(kept.blocks, fresh, index.nlist, index.filtered.id_limit())
        assert rebuilt is not None
        np.testing.assert_array_equal(kept.per_list, rebuilt.per_list)


def build(factory: str, tmp_path: Path) -> tuple[VectorIndex, World]:
    """Many add batches, a replacement of 1000 ids, 1000 deletions, save and load;
    filtered searches between them with the same filters (what the index keeps of a
    filter is updated by each write)."""
    rng = np.random.default_rng(0)
    centers = l2_normalize(rng.standard_normal((CLUSTERS, D)).astype(np.float32))
    xb, labels = mixture(N, 1, centers)
    xq, _ = mixture(300, 2, centers)
    ids = np.arange(5, 5 + 7 * N, 7, dtype=np.int64)  # ids are not positions
    filters = {f"{kind} {share:.0%}": blocks for share in (0.1, 0.5) for kind, blocks in subsets(ids, labels, share).items()}
    index = VectorIndex.create(factory, D)
    if not index.is_trained:
        assert index.train_size() >= 39 * index.nlist
        index.train(xb[rng.choice(N, min(N, index.train_size()), replace=False)])
    for start in range(0, N, 1500):  # 14 batches
        index.add(ids[start : start + 1500], xb[start : start + 1500])
        if start == 7 * 1500:  # half of them in
            check_filtered(index, World(ids[: start + 1500], xb[: start + 1500], labels, xq[:50]), filters, 0.9)
    assert index.ntotal == N
    replaced = rng.choice(N, 1000, replace=False)  # new vectors under the same ids
    xb[replaced], labels[replaced] = mixture(1000, 3, centers)
    index.add(ids[replaced], xb[replaced])
    assert index.ntotal == N
    check_filtered(index, World(ids, xb, labels, xq[:50]), filters, 0.9)
    gone = rng.choice(np.setdiff1d(np.arange(N), replaced), 1000, replace=False)
    assert index.remove(ids[gone]) == 1000
    assert index.remove(ids[gone[:10]]) == 0
    keep = np.setdiff1d(np.arange(N), gone)
    world = World(ids[keep], xb[keep], labels[keep], xq)
    check_filtered(index, World(world.ids, world.xb, world.labels, xq[:50]), filters, 0.9)
    assert_filters_current(index)
    if index.nlist:
        sample = np.random.default_rng(4).choice(len(keep), 200, replace=False)
        nprobe, recall = index.tune(world.xb[sample], TARGET, truth=true_others(world, sample))
        assert index.tuning is not None and index.tuning.exact and index.tuning.vectors == N - 1000
        assert (index.tuning.nprobe, index.recall_at_10) == (nprobe, round(recall, 4)) and recall >= TARGET
    index.save(tmp_path / "index.faiss")
    loaded = VectorIndex.load(tmp_path / "index.faiss", factory)
    assert loaded.ntotal == N - 1000 and loaded.nprobe == index.nprobe  # the file keeps the tuned nprobe
    return loaded, world


def true_others(w: World, sample: np.ndarray) -> np.ndarray:
    """The exact K nearest others of the vectors at ``sample`` (each one's own first, dropped)."""
    return exact(w.xb[sample], w.xb, w.ids, K + 1)[1][:, 1:]


def exact(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = xq @ xb.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < len(xb) else np.tile(np.arange(len(xb)), (len(xq), 1))
    order = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable"), 1)
    return np.take_along_axis(scores, order, 1), ids[order]


@pytest.fixture(scope="module", params=FACTORIES)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, VectorIndex, World]:
    index, world = build(request.param, tmp_path_factory.mktemp("idx"))
    return request.param, index, world


def test_ivf_nlist_leaves_enough_training_points() -> None:
    for n in (1, 100, 5_000, 20_000, FLAT_MAX + 1, 500_000, 10_000_000):
        nlist = ivf_nlist(n)
        assert nlist >= 1 and (nlist == 1 or 39 * nlist <= n)
    assert ivf_nlist(500_000) == 2048 and ivf_nlist(20_000) == 256


def test_train_size_follows_the_factory() -> None:
    assert VectorIndex.create("IDMap2,Flat", D).train_size() == 0
    assert VectorIndex.create("IVF256,SQ8", D).train_size() == 256 * 256  # faiss uses no more
    assert VectorIndex.create("IVF1024,SQ8", D).train_size() == 100_000  # the old fixed sample
    assert VectorIndex.create("IVF16384,SQ8", D).train_size() >= 39 * 16384
    assert VectorIndex.create("IVF16384,PQ16x8", D).train_size() >= 39 * 16384


def test_unfiltered_search_against_brute_force(built: tuple[str, VectorIndex, World]) -> None:
    factory, index, w = built
    D_, I_ = index.search(w.xq, K)
    D_bf, I_bf = exact(w.xq, w.xb, w.ids, K)
    if index.nlist == 0:
        np.testing.assert_array_equal(I_, I_bf)
        np.testing.assert_allclose(D_, D_bf, rtol=1e-5, atol=1e-5)
        return
    recall = recall_at_k(I_, I_bf, K)
    print(f"{factory}: nprobe {index.nprobe}/{index.nlist}, recall@10 {recall:.3f}")
    assert recall >= TARGET, f"{factory} at nprobe {index.nprobe}: recall@10 {recall:.3f}"


@pytest.mark.parametrize("share", [0.01, 0.1, 0.5])
def test_filtered_search_against_brute_force(built: tuple[str, VectorIndex, World], share: float) -> None:
    factory, index, w = built
    for kind, blocks in subsets(w.ids, w.labels, share).items():
        allowed = np.concatenate(list(blocks.values()))
        before = index.paths.copy()
        D_, I_ = index.search(w.xq, K, blocks, BlockCache())
        took = dict(index.paths - before)
        assert sum(took.values()) == len(w.xq), took
        assert np.isin(I_[I_ >= 0], allowed).all()
        assert (I_ >= 0).all(), "a filter allowing >= k ids gives k results"
        mask = np.isin(w.ids, allowed)
        D_bf, I_bf = exact(w.xq, w.xb[mask], w.ids[mask], K)
        if index.nlist == 0:
            np.testing.assert_array_equal(I_, I_bf)
            np.testing.assert_allclose(D_, D_bf, rtol=1e-5, atol=1e-5)
            continue
        recall = recall_at_k(I_, I_bf, K)
        print(f"{factory} {kind} {share:.0%}: recall@10 {recall:.3f}, paths {took}")
        assert recall >= TARGET, f"{factory}, {kind} {share:.0%}: {recall:.3f} ({took})"


def test_tune_nprobe_picks_the_smallest_reaching_the_target(built: tuple[str, VectorIndex, World]) -> None:
    factory, index, w = built
    if index.nlist == 0:
        pytest.skip("exact")
    xq, served = w.xb[:200], index.nprobe
    truth = true_others(w, np.arange(200))
    nprobe, recall = tune_nprobe(index, xq, TARGET, truth=truth)
    assert recall >= TARGET and 1 <= nprobe <= index.nlist and index.nprobe == served  # measured, not set
    assert tune_nprobe(index, xq, 0.01, truth=truth) == (1, pytest.approx(tune_nprobe(index, xq, 0.01, truth=truth)[1]))
    # against the exhaustive search of its own codes (no truth given) it needs no more probes
    assert tune_nprobe(index, xq, TARGET)[0] <= nprobe
    # a target the codes cannot reach: 99% of what the exhaustive search reaches
    params = faiss.SearchParametersIVF(nprobe=index.nlist)
    ceiling = recall_at_k(index.index.search(xq, K + 1, params=params)[1], truth, K + 1)
    high, reached = tune_nprobe(index, xq, 1.0, truth=truth)
    assert nprobe <= high <= index.nlist and reached >= 0.99 * ceiling
    print(f"{factory}: exhaustive recall@10 {ceiling:.3f}; nprobe {high} reaches {reached:.3f}")


def test_build_index_trains_on_enough_vectors_and_tunes_nprobe(tmp_path: Path) -> None:
    """indexfile.build_index: IVF from the catalog's vectors, nprobe tuned and kept on save/load."""
    from vsearch.catalog import BASE_MODEL, Catalog
    from vsearch.config import IndexConfig, ModelConfig
    from vsearch.indexfile import build_index, load_saved_index
    from vsearch.manifest import IndexManifest, IndexPaths
    from vsearch.projection import Projection

    rng = np.random.default_rng(0)
    centers = l2_normalize(rng.standard_normal((CLUSTERS, D)).astype(np.float32))
    xb, _ = mixture(5000, 1, centers)
    catalog = Catalog.open(tmp_path / "catalog.db")
    with catalog.transaction():
        catalog.upsert_product("p", category="c")
        for n, x in enumerate(xb):
            catalog.put_image("p", f"{n}.jpg", f"sha{n}", 1, 1, x)
    factory = f"IVF{ivf_nlist(5000)},SQ8"
    model = ModelConfig(name="efficientnet-lite2", family="timm-efficientnet-lite", arch="efficientnet_lite2")
    manifest = IndexManifest(model, index=IndexConfig(factory=factory), dim=D, factory=factory)
    index = build_index(catalog, manifest, Projection(), BASE_MODEL)
    assert index.ntotal == 5000 and index.recall_at_10 is not None and index.recall_at_10 >= TARGET
    assert 1 <= index.nprobe < index.nlist
    # recorded: nprobe, recall@10 against exact search, on how many vectors; the manifest
    # gets it when the index is served (writer.swap, like the factory)
    tuning = index.tuning
    assert tuning is not None and manifest.tuning is None
    manifest.tuning = tuning
    assert (tuning.nprobe, tuning.vectors, tuning.queries, tuning.target, tuning.exact) == (index.nprobe, 5000, 200, 0.95, True)
    paths = IndexPaths(tmp_path)
    index.save(paths.index)
    manifest.catalog_generation = catalog.generation
    manifest.save(paths)
    reread = IndexManifest.load(paths)
    assert reread.tuning == tuning
    loaded = load_saved_index(paths, reread, floor=0)
    assert loaded is not None and loaded.nprobe == index.nprobe and loaded.tuning == tuning
    untuned = IndexManifest(
        manifest.model, index=IndexConfig(factory=factory, nprobe=7, tune_recall=None), dim=D, factory=factory
    )
    plain = build_index(catalog, untuned, Projection(), BASE_MODEL)
    assert plain.nprobe == 7 and plain.tuning is None
    catalog.close()


def test_filtered_rows_the_probes_cannot_fill_escalate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows short of k after probing: 4x the probes, then the exact scan; each counted."""
    import vsearch.filtered

    for name in ("FILTER_SCAN_FACTOR", "FILTER_NEAR_LISTS", "FILTER_FAR_LISTS"):
        monkeypatch.setattr(vsearch.filtered, name, 0.01)  # probe next to nothing
    rng = np.random.default_rng(0)
    centers = l2_normalize(rng.standard_normal((CLUSTERS, D)).astype(np.float32))
    xb, _ = mixture(4000, 1, centers)
    ids = np.arange(4000, dtype=np.int64) * 2
    index = VectorIndex.create("IVF64,Flat", D, nprobe=1)
    index.train(xb)
    index.add(ids, xb)
    allowed = np.sort(rng.choice(ids, 2000, replace=False))
    xq, _ = mixture(20, 2, centers)
    _, I_ = index.search(xq, 50, {"half": allowed})
    assert (I_ >= 0).all() and np.isin(I_, allowed).all()
    assert index.paths["exact_fallback"] > 0 and sum(index.paths.values()) == len(xq), index.paths
    before = index.paths.copy()
    _, I_ = index.search(xq, 1000, {"half": allowed})  # more than a few lists hold: every row ends exact
    assert dict(index.paths - before) == {"exact_fallback": len(xq)}
    mask = np.isin(ids, allowed)
    np.testing.assert_array_equal(I_, exact(xq, xb[mask], ids[mask], 1000)[1])

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vsearch.categories import BlockCache
from vsearch.errors import ConfigError
from vsearch.index import VectorIndex
from vsearch.ivflists import ListFilter, ListMap
from vsearch.projection import l2_normalize
from vsearch.sizing import FLAT_MAX, choose_factory
from vsearch.topk import merge_topk

D = 32


def dataset(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xb = l2_normalize(rng.standard_normal((n, D)).astype(np.float32))
    ids = np.arange(1000, 1000 + 3 * n, 3, dtype=np.int64)  # ids are not list positions
    return ids, xb


def brute_force(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = xq @ xb.T
    order = np.argsort(-scores, axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), ids[order]


def test_choose_factory_by_size() -> None:
    assert choose_factory(10, 256) == "IDMap2,Flat"
    assert choose_factory(FLAT_MAX, 256) == "IDMap2,Flat"
    assert choose_factory(500_000, 256) == "IVF2048,SQ8"  # 4 * sqrt(5e5) = 2828 -> nearest power of two
    # never IVF-PQ: its recall@10 stays near 0.63, and re-ranked it holds more bytes than SQ8
    assert choose_factory(10_000_000, 256) == "IVF16384,SQ8"
    assert choose_factory(10_000_000, 1392) == "IVF16384,SQ8"
    with pytest.raises(ConfigError):
        choose_factory(10, 0)


def test_bad_factory_string_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="invalid faiss factory"):
        VectorIndex.create("NotAnIndex42", D)


def test_flat_search_matches_brute_force_and_uses_catalog_ids() -> None:
    ids, xb = dataset(500)
    index = VectorIndex.create("IDMap2,Flat", D)
    index.add(ids, xb)
    xq = xb[:7] + 0.01
    D_, I_ = index.search(xq, 10)
    D_bf, I_bf = brute_force(xq, xb, ids, 10)
    np.testing.assert_array_equal(I_, I_bf)
    np.testing.assert_allclose(D_, D_bf, rtol=1e-5)


@pytest.mark.parametrize("factory", ["IDMap2,Flat", "IVF16,Flat"])
def test_filtered_search_equals_brute_force_over_the_subset(factory: str) -> None:
    ids, xb = dataset(2000)
    index = VectorIndex.create(factory, D, nprobe=2)
    index.train(xb)
    index.add(ids, xb)
    rng = np.random.default_rng(1)
    picked = rng.permutation(ids)
    # disjoint blocks, as categories are: a union of several, one smaller than k
    blocks = {"small": np.sort(picked[:4]), "mid": np.sort(picked[4:19]), "other": np.sort(picked[19:49])}
    allowed = np.concatenate(list(blocks.values()))
    xq = l2_normalize(rng.standard_normal((5, D)).astype(np.float32))
    k = 10
    cache = BlockCache()
    mask = np.isin(ids, allowed)
    D_bf, I_bf = brute_force(xq, xb[mask], ids[mask], k)
    for _ in range(2):  # the second search reads the blocks' vectors from the cache
        D_, I_ = index.search(xq, k, blocks, cache)
        np.testing.assert_array_equal(I_, I_bf)
        np.testing.assert_allclose(D_, D_bf, rtol=1e-5)
    assert set(np.unique(I_)) - set(blocks["small"]) and set(np.unique(I_)) - set(blocks["other"])


def test_block_cache_stays_within_its_byte_budget() -> None:
    ids, xb = dataset(400)
    index = VectorIndex.create("IDMap2,Flat", D)
    index.add(ids, xb)
    block_bytes = 100 * D * 4
    cache = BlockCache(max_bytes=2 * block_bytes)
    blocks = {f"c{n}": ids[n * 100 : (n + 1) * 100] for n in range(4)}
    for key, block in blocks.items():
        _, I_ = index.search(xb[:3], 5, {key: block}, cache)
        assert np.isin(I_, block).all()
        assert cache.nbytes <= 2 * block_bytes
    assert cache.nbytes == 2 * block_bytes  # the two most recent blocks
    huge = BlockCache(max_bytes=block_bytes // 2)  # a block bigger than the budget is used, not kept
    D_, _ = index.search(xb[:1], 1, {"c0": blocks["c0"]}, huge)
    assert D_[0, 0] == pytest.approx(1.0) and huge.nbytes == 0


def test_large_filter_on_ivf_returns_k_results_from_the_subset() -> None:
    ids, xb = dataset(4000)
    index = VectorIndex.create("IVF32,Flat", D, nprobe=1)
    index.train(xb)
    index.add(ids, xb)
    allowed = np.sort(ids[::2])  # 50%: goes through the faiss selector
    xq = xb[:20]
    D_, I_ = index.search(xq, 50, {"half": allowed})
    assert (I_ >= 0).all(), "a filter matching >= k ids must give k results"
    assert np.isin(I_, allowed).all()


def test_filter_smaller_than_k_pads_with_minus_one() -> None:
    ids, xb = dataset(100)
    index = VectorIndex.create("IDMap2,Flat", D)
    index.add(ids, xb)
    D_, I_ = index.search(xb[:1], 5, {"tiny": ids[:3]})
    assert sorted(I_[0, :3]) == sorted(ids[:3]) and (I_[0, 3:] == -1).all()


def test_remove_and_replace_keep_ids_stable(tmp_path: Path) -> None:
    ids, xb = dataset(50)
    index = VectorIndex.create("IDMap2,Flat", D)
    index.add(ids, xb)
    assert index.remove(ids[:10]) == 10
    assert index.ntotal == 40
    _, I_ = index.search(xb[20:21], 1)
    assert I_[0, 0] == ids[20]
    index.add(ids[20:21], xb[0:1])  # replace the vector under the same id
    assert index.ntotal == 40
    _, I_ = index.search(xb[0:1], 1)
    assert I_[0, 0] == ids[20]
    index.save(tmp_path / "i.faiss")
    loaded = VectorIndex.load(tmp_path / "i.faiss", "IDMap2,Flat", mmap=True)
    assert loaded.ntotal == 40
    np.testing.assert_array_equal(loaded.search(xb[:5], 3)[1], index.search(xb[:5], 3)[1])


def test_ivf_recall_against_exact() -> None:
    ids, xb = dataset(5000)
    index = VectorIndex.create("IVF64,SQ8", D, nprobe=16)
    index.train(xb)
    index.add(ids, xb)
    xq = l2_normalize(xb[:50] + 0.05)
    _, I_ = index.search(xq, 10)
    _, I_bf = brute_force(xq, xb, ids, 10)
    one_recall_at_10 = np.mean([bf[0] in found for found, bf in zip(I_, I_bf)])
    assert one_recall_at_10 >= 0.95


def test_merge_topk_orders_and_pads() -> None:
    D_, I_ = merge_topk(np.array([[0.1, 0.9, 0.5]]), np.array([[1, 2, -1]]), 4)
    assert I_.tolist() == [[2, 1, -1, -1]]
    assert D_[0, 0] == pytest.approx(0.9)


@pytest.mark.parametrize("factory", ["IDMap2,Flat", "IVF16,Flat"])
def test_blocks_naming_ids_the_index_lacks_search_what_it_has(factory: str) -> None:
    """A search on an index a swap has retired may get blocks read from a newer catalog."""
    ids, xb = dataset(500)
    index = VectorIndex.create(factory, D, nprobe=16)
    index.train(xb)
    index.add(ids[:400], xb[:400])
    block = np.sort(np.concatenate([ids[390:400], ids[450:460]]))  # half of it was never added
    D_, I_ = index.search(xb[390:392], 15, {"c": block}, BlockCache())
    assert set(I_[I_ >= 0].tolist()) == set(ids[390:400].tolist())
    assert I_[0, 0] == ids[390] and I_[1, 0] == ids[391]


def clustered(n: int, seed: int = 0, clusters: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` points around ``clusters`` centres, catalog-like ids (gaps), each one's cluster."""
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.standard_normal((clusters, D)).astype(np.float32))
    labels = rng.integers(0, clusters, n)
    xb = l2_normalize((centres[labels] + rng.normal(scale=0.15, size=(n, D))).astype(np.float32))
    return 1 + np.arange(n, dtype=np.int64) * 2, xb, labels


def kept_filters_are_current(index: VectorIndex) -> None:
    """The id -> list map and every kept filter's per-list counts, updated write by
    write, equal what reading the lists afresh gives."""
    assert index.filtered.lists is not None
    fresh = ListMap.read(index.index, index.filtered.id_limit())
    assert fresh is not None
    np.testing.assert_array_equal(index.filtered.lists.of[: len(fresh.of)], fresh.of)
    assert (index.filtered.lists.of[len(fresh.of) :] == -1).all()
    np.testing.assert_array_equal(index.filtered.lists.sizes, fresh.sizes)
    for kept in index.filtered.filters.values():
        rebuilt = ListFilter.build(kept.blocks, fresh, index.nlist, index.filtered.id_limit())
        assert rebuilt is not None
        np.testing.assert_array_equal(kept.per_list, rebuilt.per_list)


def test_filtered_ivf_keeps_what_a_filter_needs_current_through_writes() -> None:
    """A filter's bitmap and per-list counts are built once, and each add, replace and
    remove updates them (and the id -> list map) by what it changed; searches between
    the writes match brute force over what the index holds then."""
    ids, xb, labels = clustered(6000)
    index = VectorIndex.create("IVF32,Flat", D, nprobe=4)
    index.train(xb)
    index.add(ids[:4000], xb[:4000], new=True)
    blocks = {f"c{c}": ids[labels == c] for c in range(8)}  # 8 of 20 clusters, some ids not added yet
    xq = l2_normalize(xb[::97] + 0.02)
    rng = np.random.default_rng(3)
    held = np.zeros(len(ids), dtype=bool)
    held[:4000] = True
    for step in range(4):
        _, I_ = index.search(xq, 10, blocks)
        allowed = held & np.isin(ids, np.concatenate(list(blocks.values())))
        _, I_bf = brute_force(xq, xb[allowed], ids[allowed], 10)
        assert np.mean([len(np.intersect1d(a, b)) for a, b in zip(I_, I_bf)]) >= 9.5, step
        assert len(index.filtered.filters) == 1  # built once, found again by the blocks' identity
        kept_filters_are_current(index)
        if step == 0:
            index.add(ids[4000:], xb[4000:], new=True)  # past the map's end: it grows
            held[4000:] = True
        elif step == 1:
            moved = rng.choice(len(ids), 500, replace=False)  # replaced by another cluster's vectors
            xb[moved] = xb[rng.choice(len(ids), 500)]
            index.add(ids[moved], xb[moved])
        else:
            gone = rng.choice(np.flatnonzero(held), 700, replace=False)
            assert index.remove(ids[gone]) == 700
            held[gone] = False
    assert index.paths["selector"] > 0


def test_a_changed_block_is_a_new_filter_and_old_ones_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    import vsearch.filtered as vi

    monkeypatch.setattr(vi, "FILTER_CACHE_ENTRIES", 3)
    ids, xb, labels = clustered(4000)
    index = VectorIndex.create("IVF16,Flat", D, nprobe=2)
    index.train(xb)
    index.add(ids, xb, new=True)
    half = {"a": ids[labels < 10], "b": ids[labels >= 15]}
    index.search(xb[:2], 5, half)
    index.search(xb[:2], 5, dict(half))  # another dict of the same arrays: the same filter
    assert len(index.filtered.filters) == 1
    changed = {"a": np.union1d(half["a"], ids[labels == 12]), "b": half["b"]}  # a write makes a new array
    _, I_ = index.search(xb[:2], 5, changed)
    assert len(index.filtered.filters) == 2 and np.isin(I_, np.concatenate(list(changed.values()))).all()
    for c in range(5):
        index.search(xb[:2], 5, {"x": ids[labels != c]})
    assert len(index.filtered.filters) == 3


def test_ids_too_sparse_for_the_list_map_search_exactly() -> None:
    ids, xb, _ = clustered(3000)
    index = VectorIndex.create("IVF16,Flat", D, nprobe=2)
    index.train(xb)
    index.add(ids, xb, new=True)
    allowed = ids[::2]
    xq = xb[:5] + 0.01
    index.search(xq, 10, {"half": allowed})
    assert index.filtered.lists is not None and index.paths["selector"] == 5
    huge = np.array([1 << 40], dtype=np.int64)  # far past 16 ids a vector
    extra = l2_normalize(xb[:1] + 0.05)
    index.add(huge, extra, new=True)
    assert index.filtered.lists is None and index.filtered.sparse_ids and not index.filtered.filters
    D_, I_ = index.search(xq, 10, {"half": np.append(allowed, huge)})
    assert index.paths["exact"] == 5
    mask = np.isin(ids, allowed)
    _, I_bf = brute_force(xq, np.concatenate([xb[mask], extra]), np.append(ids[mask], huge), 10)
    np.testing.assert_array_equal(I_, I_bf)


def test_search_paths_metric_never_goes_down_when_the_index_is_replaced() -> None:
    from vsearch.metrics import Metrics

    ids, xb, _ = clustered(500)
    first = VectorIndex.create("IDMap2,Flat", D)
    first.add(ids, xb, new=True)
    served: list[VectorIndex | None] = [first]
    metrics = Metrics(lambda: 0.0, index=lambda: served[0])
    first.search(xb[:3], 5)
    first.search(xb[:2], 5, {"c": ids[:50]})
    text = metrics.render().decode()
    assert 'vsearch_search_path_total{path="all"} 3.0' in text and 'vsearch_search_path_total{path="exact"} 2.0' in text
    assert 'vsearch_search_path_total{path="selector"} 0.0' in text  # every path, from the start
    first.search(xb[:4], 5)  # counted after the last scrape, before the swap
    second = VectorIndex.create("IDMap2,Flat", D)
    second.add(ids, xb, new=True)
    served[0] = second
    second.search(xb[:1], 5)
    assert 'vsearch_search_path_total{path="all"} 8.0' in metrics.render().decode()
    del first
    served[0] = None  # gone; what the last scrape saw of the second index is kept
    text = metrics.render().decode()
    assert 'vsearch_search_path_total{path="all"} 8.0' in text and 'path="exact"} 2.0' in text


def test_manifest_tuning_is_optional_and_old_manifests_load(tmp_path: Path) -> None:
    import json

    from vsearch.config import ModelConfig
    from vsearch.manifest import IndexManifest, IndexPaths
    from vsearch.sizing import IndexTuning

    paths = IndexPaths(tmp_path)
    model = ModelConfig(name="efficientnet-lite2", family="timm-efficientnet-lite", arch="efficientnet_lite2")
    manifest = IndexManifest(model, dim=D, factory="IVF64,SQ8")
    manifest.tuning = IndexTuning(nprobe=6, recall_at_10=0.9612, vectors=5000, queries=200, target=0.95)
    manifest.save(paths)
    assert IndexManifest.load(paths).tuning == manifest.tuning
    data = json.loads(paths.manifest.read_text())
    assert data["tuning"] == {"nprobe": 6, "recall_at_10": 0.9612, "vectors": 5000, "queries": 200, "target": 0.95, "exact": True}
    del data["tuning"]  # a manifest written before the field existed
    paths.manifest.write_text(json.dumps(data))
    old = IndexManifest.load(paths)
    assert old.tuning is None and old.factory == "IVF64,SQ8" and old.format_version == data["format_version"]
    data["added_later"] = {"x": 1}  # a field of a newer vsearch: ignored
    paths.manifest.write_text(json.dumps(data))
    assert IndexManifest.load(paths).tuning is None


def test_a_filter_spread_evenly_is_probed_by_faiss_and_whole_clusters_are_planned() -> None:
    """A filter at random leaves every query near allowed ids (faiss probes its nearest
    lists itself); one of whole clusters leaves queries far from them (planned probes)."""
    ids, xb, labels = clustered(4000)
    index = VectorIndex.create("IVF16,Flat", D, nprobe=2)
    index.train(xb)
    index.add(ids, xb, new=True)
    spread = {"r": np.sort(np.random.default_rng(1).choice(ids, 2000, replace=False))}
    whole = {"c": ids[labels < 10]}
    for blocks, expected in ((spread, True), (whole, False)):
        _, I_ = index.search(xb[:3], 5, blocks)
        found = index.filtered.filter(blocks)
        assert index.filtered.lists is not None and found is not None and found.spread(index.filtered.lists.sizes) is expected
        assert np.isin(I_, blocks[next(iter(blocks))]).all()

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vsearch.categories import BlockCache
from vsearch.errors import ConfigError
from vsearch.index import FLAT_MAX, VectorIndex, choose_factory, merge_topk
from vsearch.projection import l2_normalize

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
    assert choose_factory(10_000_000, 256) == "IVF16384,PQ64x8"
    assert choose_factory(10_000_000, 1392).startswith("IVF16384,PQ")
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

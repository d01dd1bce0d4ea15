"""GPU paths: skipped where faiss or torch sees no GPU (as on the CI machines)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vsearch.embed import Embedder
from vsearch.index import VectorIndex, gpu_available
from vsearch.presets import resolve_model
from vsearch.projection import l2_normalize

from .conftest import make_image


@pytest.mark.skipif(not gpu_available(), reason="faiss sees no GPU (install .[gpu] on a machine with one)")
def test_gpu_index_gives_the_cpu_results() -> None:
    rng = np.random.default_rng(0)
    xb = l2_normalize(rng.standard_normal((20_000, 64)).astype(np.float32))
    ids = np.arange(5, 5 + 2 * len(xb), 2, dtype=np.int64)
    cpu = VectorIndex.create("IDMap2,Flat", 64)
    cpu.add(ids, xb)
    expected = cpu.search(xb[:50], 10)
    assert cpu.to_gpu()
    D, I = cpu.search(xb[:50], 10)
    np.testing.assert_array_equal(I, expected[1])
    np.testing.assert_allclose(D, expected[0], atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
def test_cuda_autocast_embeddings_match_the_cpu() -> None:
    images = [make_image(i, size=(200, 160)) for i in range(4)]
    config = resolve_model("tiny-test")
    cpu = Embedder(config, device="cpu").embed_images(images)
    cuda = Embedder(config, device="cuda").embed_images(images)
    assert (np.sum(cpu * cuda, axis=1) > 0.99).all()

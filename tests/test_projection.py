"""PCA from the covariance's eigenvectors (float32 products of a chunk of rows at a
time, summed in float64) equals PCA by a float64 SVD (up to each component's sign,
which is fixed), and whitening scales by the same singular values."""

from __future__ import annotations

import numpy as np
import pytest

from vsearch.config import ProjectionConfig
from vsearch.projection import Projection


@pytest.mark.parametrize("offset", [0.5, 50.0])  # a mean far from 0: centring in float32 must not lose the spread
def test_pca_matches_svd_up_to_sign_and_is_deterministic(offset: float) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((20000, 40)) @ np.diag(np.linspace(3, 0.1, 40)) + offset).astype(np.float32)
    for whiten in (False, True):
        config = ProjectionConfig(pca_dim=8, whiten=whiten)
        fitted = Projection.fit(x, config)
        centred = x.astype(np.float64) - x.mean(axis=0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        want = vt[:8]
        if whiten:
            want = want / (s[:8, None] / np.sqrt(len(x)) + 1e-6)
        assert fitted.components is not None and fitted.mean is not None
        np.testing.assert_allclose(fitted.mean, x.astype(np.float64).mean(axis=0), atol=1e-5)
        np.testing.assert_allclose(np.abs(fitted.components), np.abs(want), rtol=1e-3, atol=1e-4)
        again = Projection.fit(x[::-1].copy(), config)
        np.testing.assert_allclose(again.components, fitted.components, rtol=1e-4, atol=1e-5)

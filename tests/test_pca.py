"""features/pca.py against numpy: axes, projection and whitening (identity covariance of the fitted rows)."""

import numpy as np
import pytest
import torch

from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.features.pca import Pca


def rows(n: int = 3000, seed: int = 0) -> np.ndarray:
    """Correlated rows (n, 5) with distinct variances and a non-zero mean."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(5, 5)) * np.array([6.0, 3.0, 1.0, 0.5, 0.1])[:, None]
    return rng.normal(size=(n, 5)) @ mixing + np.array([1.0, -2.0, 3.0, 0.0, 5.0])


def test_projection_and_whitening_match_numpy() -> None:
    x = rows()
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))  # ascending
    axes, values = vectors[:, ::-1][:, :3], values[::-1][:3]
    plain = Pca.fit(torch.from_numpy(x), 3)
    white = Pca.fit(torch.from_numpy(x), 3, whiten=True)
    signs = np.sign((plain.axes.numpy() * axes).sum(0))  # axes are defined up to sign
    np.testing.assert_allclose(plain.axes.numpy() * signs, axes, atol=1e-8)
    np.testing.assert_allclose(plain(torch.from_numpy(x)).numpy() * signs, (x - x.mean(0)) @ axes, atol=1e-8)
    whitened = white(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(whitened * signs, (x - x.mean(0)) @ axes / np.sqrt(values), atol=1e-8)
    np.testing.assert_allclose(np.cov(whitened, rowvar=False), np.eye(3), atol=1e-10)  # before any renormalisation
    assert white(torch.from_numpy(x).float()).dtype == torch.float32


def test_row_sample_is_seeded_and_sizes_are_checked() -> None:
    x = torch.from_numpy(rows(500))
    first, again = Pca.fit(x, 2, max_rows=100, seed=3), Pca.fit(x, 2, max_rows=100, seed=3)
    assert torch.equal(first.axes, again.axes) and torch.equal(first.mean, again.mean)
    assert not torch.equal(first.mean, Pca.fit(x, 2).mean)  # a sample of 100 rows, not all 500
    for dims in (0, 6):
        with pytest.raises(ConfigError, match=f"pca={dims}"):
            Pca.fit(x, dims)

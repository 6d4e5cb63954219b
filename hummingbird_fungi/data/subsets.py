"""Seeded subsets: one meaning of "limit the number of images" for every dataset."""

from __future__ import annotations

import numpy as np


def random_subset(total: int, count: int, seed: int) -> np.ndarray:
    """Sorted indices of `count` of `total` items drawn without replacement by a seeded permutation."""
    return np.sort(np.random.default_rng(seed).permutation(total)[:count])

"""Seeded subsets: one meaning of "limit the number of images" for every dataset, and nested fraction file sets.

A subset size is a count n >= 1 or a fraction f in (0, 1) of the N ids of a split (after any file
set): a count keeps min(n, N) ids, a fraction max(1, floor(f * N + 0.5)) (rounded half up). Which
ids: each id is ranked by the SHA-256 digest of "<seed>/<id>" and the first ones are kept, returned
in the split's sorted order. The rank depends only on the seed and the id, so for one seed a smaller
subset always lies inside a larger one (1/128 within 1/64 within 1/8), and images added to or
removed from a split do not change which of the other ids a seed prefers.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from hummingbird_fungi.config.schema import check_subset
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.fileio import write_atomic

log = logging.getLogger(__name__)

FILE_SET_DENOMINATORS = (8, 64, 128)  # the 1/8, 1/64 and 1/128 fractions of the data-efficient tables


def subset_count(size: int | float, total: int) -> int:
    """Ids a subset keeps of `total`: a count n -> min(n, total); a fraction f -> max(1, floor(f total + 0.5))."""
    problem = check_subset(size)
    if problem:
        raise ConfigError(f"subset size {size!r}: {problem}")
    count = size if isinstance(size, int) else max(1, math.floor(size * total + 0.5))
    return min(count, total)


def subset_seed(configured: int | None, run_seed: int) -> int:
    """The seed of data.subset and data.eval_subset: data.subset_seed, or the run's seed when that is null."""
    return run_seed if configured is None else configured


def seeded_order(ids: Sequence[str], seed: int) -> list[int]:
    """Positions of `ids` ordered by the SHA-256 hex digest of '<seed>/<id>' (ties, i.e. repeated ids, by position)."""
    keys = [hashlib.sha256(f"{seed}/{i}".encode()).hexdigest() for i in ids]
    return sorted(range(len(ids)), key=lambda position: (keys[position], position))


def random_subset(ids: Sequence[str], size: int | float, seed: int) -> np.ndarray:
    """Sorted positions of the `subset_count(size, len(ids))` ids that rank first for `seed`."""
    return np.sort(np.asarray(seeded_order(ids, seed)[:subset_count(size, len(ids))], dtype=np.int64))


def fraction_file_sets(ids: Sequence[str], seed: int,
                       denominators: Sequence[int] = FILE_SET_DENOMINATORS) -> dict[int, list[str]]:
    """denominator d -> the sorted ids of the seeded 1/d subset (nested: 1/128 within 1/64 within 1/8)."""
    return {d: sorted(ids[i] for i in random_subset(ids, 1 / d, seed)) for d in denominators}


def write_fraction_file_sets(ids: Sequence[str], split: str, out_dir: str | Path, seeds: Sequence[int],
                             denominators: Sequence[int] = FILE_SET_DENOMINATORS) -> list[Path]:
    """Write `<out_dir>/1_div_<d>/<split>_<d>_<seed>.txt` (one id per line) for every seed and d -> the files."""
    written = []
    for seed in seeds:
        for d, chosen in fraction_file_sets(ids, seed, denominators).items():
            path = Path(out_dir) / f"1_div_{d}" / f"{split}_{d}_{seed}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, "".join(f"{i}\n" for i in chosen).encode())
            written.append(path)
    log.info("wrote %d file sets of %d %s ids under %s", len(written), len(ids), split, out_dir)
    return written

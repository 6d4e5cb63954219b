"""Paired bootstrap over images (or sequences): a confidence interval of the difference between two feature variants.

Both variants segment the same N images; each image contributes one (C, C) confusion matrix per variant
(rows ground truth, columns prediction). A resample draws N image indices with replacement and uses
them for BOTH variants (paired); each variant's dataset mIoU is read from the SUM of the resampled
images' matrices, exactly as the toolkit's global mIoU is read from the summed matrix (not as a mean
of per-image mIoUs). The difference is `miou(b) - miou(a)` (a: the baseline, e.g. the embeddings);
the interval is the percentile interval of the resampled differences at `level`, with numpy's default
(linear) quantile interpolation. Resamples whose mIoU is undefined (nothing counted) are dropped.
`paired_bootstrap_means` does the same for a mean of per-unit scores (e.g. DAVIS's mean over
sequences of each sequence's mean J, resampling sequences); `compare` picks one of the two by the
scores' shape and names the variant's score `b`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hummingbird_fungi.errors import DataError
from hummingbird_fungi.eval.metrics import miou_standard

log = logging.getLogger(__name__)

MiouFunction = Callable[[np.ndarray], float]


def dataset_miou(matrix: np.ndarray, exclude: int | None = None) -> float:
    """The toolkit's standard mIoU (`metrics.miou_standard`) of one (C, C) count matrix."""
    return miou_standard(torch.from_numpy(np.asarray(matrix, dtype=np.int64)), exclude)[0]


def resample_indices(n_images: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_resamples, n_images) image indices drawn with replacement from a seeded generator."""
    if n_images < 1 or n_resamples < 1:
        raise ValueError(f"need at least one image and one resample, got {n_images} and {n_resamples}")
    return np.random.default_rng(seed).integers(0, n_images, size=(n_resamples, n_images))


def paired_bootstrap(cms_a: np.ndarray, cms_b: np.ndarray, miou: MiouFunction = dataset_miou,
                     n_resamples: int = 1000, level: float = 0.95, seed: int = 0,
                     indices: np.ndarray | None = None) -> dict[str, Any]:
    """Difference miou(sum b) - miou(sum a) of per-image matrices (N, C, C) and its paired percentile interval.

    `indices` (R, N) replaces the seeded draw of `n_resamples` resamples (tests, or resamples shared by rows).
    """
    cms_a, cms_b = np.asarray(cms_a, dtype=np.int64), np.asarray(cms_b, dtype=np.int64)
    if cms_a.ndim != 3 or cms_a.shape[1] != cms_a.shape[2] or cms_a.shape != cms_b.shape:
        raise ValueError(f"expected two (N, C, C) stacks of equal shape, got {cms_a.shape} and {cms_b.shape}")
    n = len(cms_a)
    draws = _draws(n, n_resamples, seed, indices, level)
    differences = np.empty(len(draws))
    for r, ids in enumerate(draws):
        counts = np.bincount(ids, minlength=n)  # (N,) times each image is drawn
        differences[r] = (miou(np.tensordot(counts, cms_b, axes=1))
                          - miou(np.tensordot(counts, cms_a, axes=1)))
    miou_a, miou_b = miou(cms_a.sum(0)), miou(cms_b.sum(0))
    return {"difference": miou_b - miou_a, **_interval(differences, level), "miou_a": miou_a, "miou_b": miou_b,
            "level": level, "n_images": n, "n_resamples": len(draws),
            "seed": None if indices is not None else seed}


def paired_bootstrap_means(values_a: np.ndarray, values_b: np.ndarray, n_resamples: int = 1000,
                           level: float = 0.95, seed: int = 0, indices: np.ndarray | None = None) -> dict[str, Any]:
    """Difference mean(b) - mean(a) of per-unit scores (N,) (e.g. per-sequence J) and its paired percentile interval."""
    values_a, values_b = np.asarray(values_a, dtype=np.float64), np.asarray(values_b, dtype=np.float64)
    if values_a.ndim != 1 or values_a.shape != values_b.shape:
        raise ValueError(f"expected two (N,) score vectors of equal shape, got {values_a.shape} and {values_b.shape}")
    n = len(values_a)
    draws = _draws(n, n_resamples, seed, indices, level)
    differences = (values_b - values_a)[draws].mean(1)  # (R,)
    return {"difference": float(values_b.mean() - values_a.mean()), **_interval(differences, level),
            "mean_a": float(values_a.mean()), "mean_b": float(values_b.mean()), "level": level, "n_units": n,
            "n_resamples": len(draws), "seed": None if indices is not None else seed}


def compare(a: np.ndarray, b: np.ndarray, draws: np.ndarray) -> dict[str, Any]:
    """Paired bootstrap of b against a over the resamples `draws` (R, N): per-image matrices (N, C, C) (dataset
    mIoU) or per-unit scores (N,) (their mean); the result's `b` is b's score."""
    if np.ndim(a) == 3:
        result = paired_bootstrap(a, b, indices=draws)
        return {**result, "b": result["miou_b"]}
    result = paired_bootstrap_means(a, b, indices=draws)
    return {**result, "b": result["mean_b"]}


def read_per_image(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(image keys (N,), confusion matrices (N, C, C)) of a `--per-image` file; DataError naming a bad file."""
    try:
        with np.load(path) as data:
            keys, matrices = data["keys"], data["confusions"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"cannot read per-image matrices from {path}: {exc}") from exc
    if matrices.ndim != 3 or matrices.shape[1] != matrices.shape[2] or len(keys) != len(matrices):
        raise DataError(f"{path}: expected keys (N,) and matrices (N, C, C), got {keys.shape} and {matrices.shape}")
    return keys, matrices


def compare_runs(runs: dict[str, tuple[np.ndarray, np.ndarray]], n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> list[dict[str, Any]]:
    """Each run's dataset mIoU and its paired interval against the first run, over the same resampled images; runs
    are {name: (keys (N,), matrices (N, C, C))} and must score the same images (matched by key)."""
    (base_name, (base_keys, base)), *others = runs.items()
    order = np.argsort(base_keys)
    draws = resample_indices(len(base_keys), n_resamples, seed)
    rows = [{"run": base_name, "miou": dataset_miou(base.sum(0)), "difference": 0.0, "low": 0.0, "high": 0.0,
             "excludes_zero": False, "n_images": len(base)}]
    for name, (keys, matrices) in others:
        if sorted(keys.tolist()) != sorted(base_keys.tolist()) or matrices.shape[1:] != base.shape[1:]:
            raise DataError(f"run {name} scores other images or classes than {base_name}: runs compare only on "
                            f"the same evaluation split")
        aligned = np.empty_like(matrices)
        aligned[order] = matrices[np.argsort(keys)]  # b's matrices in a's image order
        result = paired_bootstrap(base, aligned, indices=draws, level=level)
        rows.append({"run": name, "miou": result["miou_b"], **{key: result[key] for key in
                     ("difference", "low", "high", "excludes_zero")}, "n_images": len(matrices)})
    return rows


def format_comparison(rows: list[dict[str, Any]], level: float = 0.95) -> str:
    """The rows of `compare_runs` as a table: mIoU, difference to the first run and its interval ('*': excludes 0)."""
    width = max(len(row["run"]) for row in rows)
    lines = [f"{'run':<{width}}  {'mIoU':>6}  {'diff':>6}  {round(100 * level)}% interval (vs {rows[0]['run']})",
             f"{rows[0]['run']:<{width}}  {100 * rows[0]['miou']:6.2f}"]
    for row in rows[1:]:
        lines.append(f"{row['run']:<{width}}  {100 * row['miou']:6.2f}  {100 * row['difference']:+6.2f}  "
                     f"[{100 * row['low']:+.2f}, {100 * row['high']:+.2f}]{' *' if row['excludes_zero'] else ''}")
    return "\n".join(lines)


def _draws(n: int, n_resamples: int, seed: int, indices: np.ndarray | None, level: float) -> np.ndarray:
    """The (R, N) resampled ids: `indices` when given (checked), else a seeded draw; `level` checked first."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    draws = resample_indices(n, n_resamples, seed) if indices is None else np.asarray(indices, dtype=np.int64)
    if draws.ndim != 2 or draws.min(initial=0) < 0 or draws.max(initial=0) >= n:
        raise ValueError(f"resample indices must be (R, N) ids in [0, {n}), got shape {draws.shape}")
    return draws


def _interval(differences: np.ndarray, level: float) -> dict[str, Any]:
    """Percentile interval of resampled differences (NaN resamples dropped, with a warning)."""
    valid = differences[~np.isnan(differences)]
    if len(valid) < len(differences):
        log.warning("%d of %d bootstrap resamples have an undefined mIoU and are dropped",
                    len(differences) - len(valid), len(differences))
    low, high = (np.quantile(valid, [(1 - level) / 2, (1 + level) / 2]).tolist() if len(valid)
                 else (math.nan, math.nan))
    return {"low": low, "high": high, "n_valid": len(valid), "excludes_zero": bool(low > 0 or high < 0)}

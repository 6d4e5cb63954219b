"""PCA, the one label-free feature transform fitted on memory (or kNN train) rows, optionally whitening.

`Pca.fit` accumulates the covariance in float64 block by block on the rows' device (so GPU-sized
train sets fit) and keeps the top principal axes, largest variance first, as sklearn's full-SVD PCA
does up to signs; applying it centres with the fitted mean and projects in float64 (or a given dtype).
Whitening divides each coordinate by the square root of its eigenvalue (plus an optional epsilon), so
the fitted rows get identity covariance. The kNN evaluation (`eval.knn.reduce`), the feature study
(`eval.study`) and the pipeline's feature transform (`features.transform`) use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hummingbird_fungi.errors import ConfigError

COVARIANCE_ROWS = 65536  # rows per float64 block of the covariance sum


@dataclass
class Pca:
    """x -> (x - mean) @ axes, times `scale` when whitening; fitted by `Pca.fit`."""

    mean: Tensor  # (D,) float64
    axes: Tensor  # (D, d) float64, principal axes as columns, largest variance first
    scale: Tensor | None = None  # (d,) float64 1 / sqrt(eigenvalue) when whitening

    @classmethod
    def fit(cls, rows: Tensor, dims: int, whiten: bool = False, max_rows: int | None = None,
            seed: int = 0, epsilon: float = 0.0) -> "Pca":
        """The top `dims` axes of rows (N, D); more than `max_rows` rows: those of a seeded sample of that many;
        whitening scales by 1 / sqrt(eigenvalue + `epsilon`)."""
        if not 1 <= dims <= rows.shape[1]:
            raise ConfigError(f"pca={dims} must lie in [1, {rows.shape[1]}] (the feature size)")
        if max_rows is not None and rows.shape[0] > max_rows:
            keep = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]
            rows = rows[keep.to(rows.device)]
        mean = rows.double().mean(0)
        covariance = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
        for block in torch.split(rows, COVARIANCE_ROWS):
            centred = block.double() - mean
            covariance += centred.T @ centred  # (D, D)
        eigenvalues, vectors = torch.linalg.eigh(covariance / max(rows.shape[0] - 1, 1))  # ascending
        scale = (eigenvalues[-dims:].flip(0).clamp_min(1e-12) + epsilon).rsqrt() if whiten else None
        return cls(mean, vectors[:, -dims:].flip(1), scale)

    def __call__(self, x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """Rows (n, D) -> (n, d) in x's dtype, computed in `dtype` on x's device; not renormalised."""
        out = (x.to(dtype) - self.mean.to(x.device, dtype)) @ self.axes.to(x.device, dtype)
        if self.scale is not None:
            out = out * self.scale.to(x.device, dtype)
        return out.to(x.dtype)

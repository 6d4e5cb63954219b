"""PCA, the one label-free feature transform fitted on memory (or kNN train) rows, optionally whitening.

`Pca.fit` accumulates the covariance in float64 block by block on the rows' device (so GPU-sized
train sets fit) and keeps the top principal axes, largest variance first, as sklearn's full-SVD PCA
does up to signs; applying it centres with the fitted mean and projects in float64 (or a given dtype).
Whitening divides each coordinate by the square root of its eigenvalue (plus an optional epsilon), so
the fitted rows get identity covariance. The kNN evaluation (`eval.knn.reduce`), the feature study
(`eval.study`) and the pipeline's feature transform (`features.transform`) use it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from hummingbird_fungi.errors import ConfigError

log = logging.getLogger(__name__)

COVARIANCE_ROWS = 65536  # rows per float64 block of the covariance sum


@dataclass
class Pca:
    """x -> (x - mean) @ axes, times `scale` when whitening; fitted by `Pca.fit`."""

    mean: Tensor  # (D,) float64
    axes: Tensor  # (D, d) float64, principal axes as columns, largest variance first
    scale: Tensor | None = None  # (d,) float64 1 / sqrt(eigenvalue) when whitening

    @classmethod
    def fit(cls, rows: Tensor, dims: int, whiten: bool = False, max_rows: int | None = None,
            seed: int = 0, epsilon: float = 0.0, shrinkage: str = "none") -> "Pca":
        """The top `dims` axes of rows (N, D); more than `max_rows` rows: those of a seeded sample of that many;
        whitening scales by 1 / sqrt(eigenvalue + `epsilon`), the eigenvalues those of the covariance shrunk
        towards a multiple of the identity by `shrinkage` `ledoit_wolf` (unchanged with `none`)."""
        if not 1 <= dims <= rows.shape[1]:
            raise ConfigError(f"pca={dims} must lie in [1, {rows.shape[1]}] (the feature size)")
        if max_rows is not None and rows.shape[0] > max_rows:
            keep = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]
            rows = rows[keep.to(rows.device)]
        mean = rows.double().mean(0)
        covariance = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
        fourth = torch.zeros((), dtype=torch.float64, device=rows.device)  # sum of |x - mean|^4
        for block in torch.split(rows, COVARIANCE_ROWS):
            centred = block.double() - mean
            covariance += centred.T @ centred  # (D, D)
            fourth += centred.square().sum(1).square().sum()
        count = rows.shape[0]
        eigenvalues, vectors = torch.linalg.eigh(covariance / max(count - 1, 1))  # ascending
        if shrinkage == "ledoit_wolf":
            alpha = ledoit_wolf(covariance / count, float(fourth) / count, count)
            log.info("Ledoit-Wolf shrinkage %.4f of the covariance of %d rows", alpha, count)
            eigenvalues = (1 - alpha) * eigenvalues + alpha * eigenvalues.mean()
        scale = (eigenvalues[-dims:].flip(0).clamp_min(1e-12) + epsilon).rsqrt() if whiten else None
        return cls(mean, vectors[:, -dims:].flip(1), scale)

    def __call__(self, x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """Rows (n, D) -> (n, d) in x's dtype, computed in `dtype` on x's device; not renormalised."""
        out = (x.to(dtype) - self.mean.to(x.device, dtype)) @ self.axes.to(x.device, dtype)
        if self.scale is not None:
            out = out * self.scale.to(x.device, dtype)
        return out.to(x.dtype)


def ledoit_wolf(covariance: Tensor, fourth: float, count: int) -> float:
    """Ledoit-Wolf shrinkage intensity in [0, 1] of the biased covariance S (D, D) of `count` centred rows whose mean
    |x|^4 is `fourth`: min(beta, delta) / delta, beta = (fourth - |S|_F^2) / (D count), delta = |S - mu I|_F^2 / D,
    mu = tr(S) / D (`sklearn.covariance.ledoit_wolf_shrinkage`)."""
    dim = covariance.shape[0]
    mu = float(covariance.trace()) / dim
    frobenius = float(covariance.square().sum())
    delta = (frobenius - 2 * mu * float(covariance.trace()) + dim * mu * mu) / dim
    beta = min((fourth - frobenius) / (dim * count), delta)
    return 0.0 if beta <= 0 else beta / delta

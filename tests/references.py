"""Independent numpy references shared by tests (written without the package's code)."""

from __future__ import annotations

import numpy as np


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D bilinear upsampling with half-pixel centres (align_corners=False)."""
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    matrix = np.zeros((n_out, n_in))
    matrix[np.arange(n_out), lo] += 1 - (src - lo)
    matrix[np.arange(n_out), hi] += src - lo
    return matrix


def boundary_reference(mask: np.ndarray) -> np.ndarray:
    """DAVIS boundary pixels of a bool mask, from a zero-padded copy: a pixel differs from its right, lower or
    lower-right neighbour; the last row looks right only, the last column down only, the corner never."""
    padded = np.pad(mask, ((0, 1), (0, 1)))
    right, down, diagonal = padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]
    edges = (mask != right) | (mask != down) | (mask != diagonal)
    edges[-1, :] = mask[-1, :] != right[-1, :]
    edges[:, -1] = mask[:, -1] != down[:, -1]
    edges[-1, -1] = False
    return edges


def davis_f_reference(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None,
                      bound_th: float = 0.008) -> float:
    """DAVIS boundary F from Euclidean distance transforms: a boundary pixel matches when the other mask's
    boundary lies within ceil(bound_th * diagonal) pixels."""
    from scipy.ndimage import distance_transform_edt

    if void is not None:
        pred, gt = pred & ~void, gt & ~void
    radius = bound_th if bound_th >= 1 else np.ceil(bound_th * np.sqrt(gt.shape[0] ** 2 + gt.shape[1] ** 2))
    pb, gb = boundary_reference(pred), boundary_reference(gt)
    if not pb.any() or not gb.any():
        return float(pb.any() == gb.any())
    precision = (distance_transform_edt(~gb)[pb] <= radius).mean()
    recall = (distance_transform_edt(~pb)[gb] <= radius).mean()
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))

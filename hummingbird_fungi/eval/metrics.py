"""Segmentation metrics from one streaming confusion matrix: standard mIoU and the reference's
(docs/protocol.md#metrics).

Per-pixel predictions are never kept: each `update` adds a bincount to a (C, C) int64 matrix
(rows ground truth, columns prediction). Two readings of it:

* `miou_standard`: identity matching, mean IoU over the classes that occur in the ground truth
  or the predictions, optionally skipping one class (ADE20K: 0, the ignored "other" id).
* `miou_reference`: what the public implementations report: Hungarian matching of predicted to GT ids,
  IoU_i = TP/max(TP+FP+FN, 1e-8), mean over all C classes, absent ones counting 0 (so ADE20K's
  ignored class 0 always adds a zero: sum of 150 IoUs / 151).
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment
from torch import Tensor

log = logging.getLogger(__name__)


class ConfusionMatrix:
    """Streaming (C, C) int64 confusion matrix, rows = ground truth, columns = prediction."""

    def __init__(self, num_classes: int, ignore_index: int | None = None, device: str | torch.device = "cpu") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)  # (C, C)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Count pixels of integer label maps of equal shape; drops ignored and out-of-range targets."""
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError(f"labels must be integers, got {pred.dtype} and {target.dtype}")
        c = self.num_classes
        pred = pred.reshape(-1).to(self.matrix.device, torch.int64)  # (P,)
        target = target.reshape(-1).to(self.matrix.device, torch.int64)  # (P,)
        if pred.numel() and (pred.min() < 0 or pred.max() >= c):
            raise ValueError(f"predictions must be in [0, {c}), got range [{int(pred.min())}, {int(pred.max())}]")
        keep = (target >= 0) & (target < c)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        counts = torch.bincount(c * target[keep] + pred[keep], minlength=c * c)  # (C*C,)
        self.matrix += counts.reshape(c, c)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix of the same size (e.g. from another process)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class into {self.num_classes}-class confusion matrix")
        self.matrix += other.matrix.to(self.matrix.device)

    def all_reduce(self) -> None:
        """Sum the matrix over all torch.distributed ranks (no-op when not initialised)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        on_gpu = dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
        total = self.matrix.cuda() if on_gpu else self.matrix.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        self.matrix = total.to(self.matrix.device)


def class_totals(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(TP, GT pixels, predicted pixels) per class, each (C,) float64."""
    m = matrix.double()
    return m.diagonal(), m.sum(1), m.sum(0)


def iou_per_class(matrix: Tensor) -> Tensor:
    """TP/(TP+FP+FN) per class -> (C,) float64, NaN where the class is in neither GT nor predictions."""
    tp, gt, predicted = class_totals(matrix)
    union = gt + predicted - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))


def miou_standard(matrix: Tensor, exclude: int | None = None) -> tuple[float, list[float]]:
    """Mean IoU over classes present in GT or predictions, skipping `exclude`; per-class IoU (NaN if absent)."""
    iou = iou_per_class(matrix)  # (C,)
    if exclude is not None:
        iou[exclude] = math.nan
    present = ~iou.isnan()
    miou = float(iou[present].mean()) if present.any() else math.nan
    return miou, iou.tolist()


def hungarian_assignment(matrix: Tensor) -> list[int]:
    """Predicted id j -> GT id maximising the summed IoU (linear_sum_assignment on 1 - IoU_ij)."""
    m = matrix.double().cpu().numpy()  # (C, C)
    union = m.sum(1, keepdims=True) + m.sum(0, keepdims=True) - m  # GT i or predicted j
    iou = m / np.maximum(union, 1e-8)
    gt, pred = linear_sum_assignment(1.0 - iou)
    assignment = [0] * len(m)
    for i, j in zip(gt, pred):
        assignment[j] = int(i)
    return assignment


def miou_reference(matrix: Tensor) -> tuple[float, list[float], list[int]]:
    """Reference mIoU: (mean over all C of matched IoU, per-class IoU, assignment pred -> GT)."""
    assignment = hungarian_assignment(matrix)
    relabelled = torch.zeros_like(matrix).index_add_(1, torch.tensor(assignment, device=matrix.device), matrix)
    tp, gt, predicted = class_totals(relabelled)
    iou = tp / (gt + predicted - tp).clamp_min(1e-8)  # (C,)
    return float(iou.mean()), iou.tolist(), assignment


def pixel_accuracy(matrix: Tensor) -> float:
    """Correct / counted pixels (NaN when nothing was counted)."""
    total = int(matrix.sum())
    return int(matrix.trace()) / total if total else math.nan


def summarize(cm: ConfusionMatrix, class_names: Sequence[str], exclude: int | None = None) -> dict:
    """Standard and reference mIoU, per-class IoUs by name (None when absent) and pixel accuracy."""
    if len(class_names) != cm.num_classes:
        raise ValueError(f"{len(class_names)} class names for a {cm.num_classes}-class confusion matrix")
    miou, per_class = miou_standard(cm.matrix, exclude)
    ref, per_class_ref, assignment = miou_reference(cm.matrix)
    moved = {class_names[j]: class_names[i] for j, i in enumerate(assignment) if i != j}
    if moved:
        log.info("reference metric: Hungarian matching relabels %d predicted classes", len(moved))
    return {
        "miou": miou,
        "miou_reference": ref,
        "per_class_iou": {name: None if math.isnan(v) else v for name, v in zip(class_names, per_class)},
        "per_class_iou_reference": dict(zip(class_names, per_class_ref)),
        "reference_relabelled": moved,
        "pixel_accuracy": pixel_accuracy(cm.matrix),
    }


def metric_summary(cm: ConfusionMatrix, class_names: Sequence[str], ignore_index: int | None) -> dict:
    """mIoU (both modes) and per-class IoU of `cm`, leaving out an ignore index that is a class id (ADE20K's 0);
    None for every metric when no pixel was scored."""
    exclude = ignore_index if ignore_index is not None and ignore_index < len(class_names) else None
    summary = summarize(cm, class_names, exclude=exclude)
    if int(cm.matrix.sum()) == 0:
        log.warning("no ground-truth pixel was scored (all void or outside the label space): metrics are n/a")
        summary.update(miou=None, miou_reference=None, pixel_accuracy=None, reference_relabelled={},
                       per_class_iou_reference={name: None for name in class_names})
    return summary


# --------------------------------------------------------------------------- video (DAVIS)


def foreground_confusion(pred: np.ndarray, gt: np.ndarray, ignore_index: int | None = None) -> np.ndarray:
    """(2, 2) counts of ground-truth background/foreground (rows) against predicted (columns); foreground =
    id != 0, ground-truth void pixels dropped."""
    target = torch.from_numpy((gt != 0).astype(np.int64))
    if ignore_index is not None:
        target[torch.from_numpy(gt == ignore_index)] = -1  # outside [0, 2): not counted
    cm = ConfusionMatrix(2)
    cm.update(torch.from_numpy((pred != 0).astype(np.int64)), target)
    return cm.matrix.numpy()


def jaccard(confusion: np.ndarray) -> float:
    """Foreground IoU (DAVIS J) of a (2, 2) matrix; 1 when neither ground truth nor prediction has foreground."""
    iou = float(iou_per_class(torch.from_numpy(np.asarray(confusion)))[1])
    return 1.0 if np.isnan(iou) else iou


# --------------------------------------------------------------------------- DAVIS J and F per object

DAVIS_BOUNDARY = 0.008  # F's match tolerance: this fraction of the image diagonal, rounded up to whole pixels


def region_similarity(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> float:
    """DAVIS J of binary (H, W) masks: IoU with `void` pixels left out; 1 when both are empty."""
    if void is None:
        return jaccard(foreground_confusion(pred, gt))
    return jaccard(foreground_confusion(pred, np.where(void, 2, gt), ignore_index=2))


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool boundary of a binary mask, DAVIS's `seg2bmap`: pixels differing from the right, lower or
    lower-right neighbour (the last row compares to the right only, the last column downwards only)."""
    right, down, diagonal = np.zeros_like(mask), np.zeros_like(mask), np.zeros_like(mask)
    right[:, :-1], down[:-1], diagonal[:-1, :-1] = mask[:, 1:], mask[1:], mask[1:, 1:]
    edges = (mask ^ right) | (mask ^ down) | (mask ^ diagonal)
    edges[-1] = mask[-1] ^ right[-1]
    edges[:, -1] = mask[:, -1] ^ down[:, -1]
    edges[-1, -1] = False
    return edges


def disk(radius: int) -> np.ndarray:
    """(2r+1, 2r+1) bool disk: offsets (y, x) with y^2 + x^2 <= r^2."""
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return y * y + x * x <= radius * radius


def dilated_near(edges: np.ndarray, other: np.ndarray, radius: int) -> np.ndarray:
    """Pixels of `edges` within `radius` (Euclidean) of a pixel of `other`, both (H, W) bool; the dilation of
    `other` by a disk is computed on the bounding box of both, padded by the radius."""
    from scipy.ndimage import binary_dilation

    rows, cols = np.nonzero(edges | other)
    if not len(rows) or not other.any():
        return np.zeros_like(edges)
    top, left = max(rows.min() - radius, 0), max(cols.min() - radius, 0)
    box = (slice(top, rows.max() + radius + 1), slice(left, cols.max() + radius + 1))
    near = np.zeros_like(edges)
    near[box] = edges[box] & binary_dilation(other[box], structure=disk(radius))
    return near


def contour_accuracy(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None,
                     bound_th: float = DAVIS_BOUNDARY) -> float:
    """DAVIS F of binary (H, W) masks: F-measure of boundary pixels matched within ceil(bound_th * diagonal)
    pixels (`bound_th` >= 1: that many pixels); `void` pixels are cleared from both masks first."""
    if void is not None:
        pred, gt = pred & ~void, gt & ~void
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape)))
    pred_edges, gt_edges = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = int(pred_edges.sum()), int(gt_edges.sum())
    if n_pred == 0 or n_gt == 0:  # nothing to match: perfect when both are empty
        return 1.0 if n_pred == n_gt else 0.0
    precision = int(dilated_near(pred_edges, gt_edges, radius).sum()) / n_pred
    recall = int(dilated_near(gt_edges, pred_edges, radius).sum()) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def davis_frame(pred: np.ndarray, gt: np.ndarray, objects: Sequence[int],
                void_id: int | None = 255) -> tuple[list[float], list[float]]:
    """(J per object, F per object) of one frame: (H, W) id maps, object ids `objects`, `void_id` pixels of the
    ground truth left out."""
    void = None if void_id is None else gt == void_id
    pairs = [(pred == i, gt == i) for i in objects]
    return ([region_similarity(p, g, void) for p, g in pairs], [contour_accuracy(p, g, void) for p, g in pairs])


def davis_statistics(scores: Sequence[float]) -> dict[str, float | None]:
    """Mean and recall (fraction above 0.5) of one object's per-frame J or F (None without frames)."""
    values = np.asarray(scores, dtype=np.float64)
    if not values.size:
        return {"mean": None, "recall": None}
    return {"mean": float(values.mean()), "recall": float((values > 0.5).mean())}

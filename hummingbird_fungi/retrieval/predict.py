"""The predict-and-score loop, written once: query features -> neighbour search -> vote -> upsampled class
maps -> one confusion matrix per image and setting.

The benchmark (`eval.hbird.evaluate_bank`), `InContextSegmenter` (and through it folder runs and video),
the feature study and tools/compare_features.py all call `predict`; callers only decide where the
queries come from (a data loader, user images grouped by network size, cached features) and what to
do with each `Prediction` (sum the matrices, write a mask, keep per-image matrices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from hummingbird_fungi.eval.metrics import ConfusionMatrix
from hummingbird_fungi.features.base import finite_rows
from hummingbird_fungi.retrieval.transfer import (ExtraCandidates, LabelTransfer, Setting, patch_probs_to_map,
                                                  upsample_argmax)
from hummingbird_fungi.runtime import timed


@dataclass
class QueryBatch:
    """Query images of one network size (or their features), and the size each predicted mask is wanted at."""

    grid: tuple[int, int]  # (h, w) patch grid of the network input
    sizes: Sequence[tuple[int, int]]  # (H_i, W_i) of each output mask
    images: Tensor | None = None  # (B, 3, H, W) network input
    features: Tensor | None = None  # (B, N, D) when extracted already
    targets: Sequence[Tensor | None] | None = None  # (H_i, W_i) ground truth to score; None: not scored
    keys: Sequence[Any] | None = None  # the caller's names of the images (default: position in the batch)


@dataclass
class Prediction:
    """One query image: its features, patch distributions, masks and (with a target) confusion matrices."""

    key: Any
    features: Tensor  # (N, D) query patch features
    probs: Tensor  # (N, C) patch class distributions at the first setting
    masks: dict[Setting, Tensor]  # (H, W) int64 class ids per (k, temperature)
    confusions: dict[Setting, Tensor] | None  # (C, C) int64 per setting, rows ground truth; None without target


def predict(batches: Iterable[QueryBatch], transfer: LabelTransfer,
            extractor: Callable[[Tensor], Tensor] | None = None, *, settings: Sequence[Setting] | None = None,
            ignore_index: int | None = None, class_chunk: int = 32, device: torch.device | str = "cpu",
            extra: ExtraCandidates | None = None, non_finite: str = "error",
            timings: dict[str, float] | None = None) -> Iterator[Prediction]:
    """Segment (and score) every image of `batches` with `transfer`, one `Prediction` per image in order.

    Features come from `extractor` on the batch's images (moved to `device`) unless the batch holds
    them; every (k, temperature) of `settings` (default: the transfer's own) is answered from one
    search; `extra` adds candidates from outside the bank (video propagation). Query patches whose
    features hold NaN or inf are refused, or with `non_finite` 'drop' get zero features and an all-zero
    distribution (no neighbours). `timings` adds up seconds of query_features_s, upsample_s and confusion_s
    (and, through `transfer.timings`, search_s and vote_s).
    """
    settings = list(settings or [transfer.setting])
    transfer.timings = timings
    for batch in batches:
        with timed(timings, "query_features_s"):
            features = batch.features if batch.features is not None else extractor(batch.images.to(device))
        features = features.detach()
        keys = batch.keys if batch.keys is not None else range(len(batch.sizes))
        keep = finite_rows(features, [f"query {key}" for key in keys], "query feature", non_finite)  # (B, N)
        dropped = not bool(keep.all())
        if dropped:
            features = features.masked_fill(~keep[..., None], 0.0)
        voted = transfer.vote_settings(features, settings, extra)  # {setting: (B, N, C)}
        if dropped:
            voted = {s: p.masked_fill(~keep[..., None].to(p.device), 0.0) for s, p in voted.items()}
        for i, size in enumerate(batch.sizes):
            with timed(timings, "upsample_s"):
                masks = {s: upsample_argmax(patch_probs_to_map(p[i], batch.grid), tuple(size), class_chunk)
                         for s, p in voted.items()}
            target = None if batch.targets is None else batch.targets[i]
            with timed(timings, "confusion_s"):
                confusions = None if target is None else {
                    s: confusion(mask, target, transfer.bank.num_classes, ignore_index) for s, mask in masks.items()}
            yield Prediction(key=keys[i], features=features[i],
                             probs=voted[settings[0]][i], masks=masks, confusions=confusions)


def confusion(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None) -> Tensor:
    """(C, C) int64 confusion matrix of one predicted and one ground-truth map (void and out-of-range ids dropped)."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    cm.update(pred, torch.as_tensor(target))
    return cm.matrix

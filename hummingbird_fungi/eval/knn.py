"""kNN classification math: PCA fitted on train rows (`features.pca`), exact Euclidean search, votes, metrics,
few-shot draws.

Search and PCA run in torch on the rows' device, so the same code serves GPU-sized train sets.
The driver that extracts features and runs every block combination is `eval.knn_run`;
the protocol is in docs/protocol.md#image-fungi-and-knn.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.features.pca import Pca
from hummingbird_fungi.retrieval.indexes import TorchIndex

log = logging.getLogger(__name__)

VOTES = ("uniform", "weighted")
FEW_SHOT_RULES = ("first", "random")


# --------------------------------------------------------------------------- PCA and kNN


def reduce(train: torch.Tensor, test: torch.Tensor,
           n_components: int | None) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """The reference rule: PCA (`features.pca`, no whitening, not renormalised) fitted on train only if
    n_components < n_train and < D -> train (N, n), test (Q, n) and the size used (None: no PCA)."""
    if n_components is None or not (n_components < train.shape[0] and n_components < train.shape[1]):
        return train, test, None
    pca = Pca.fit(train, n_components)
    return pca(train), pca(test), n_components


def knn_search(train: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Euclidean kNN: squared distances and train ids of the k nearest, (Q, k) each, nearest first.

    Runs as the exact inner-product index over [t, -|t|^2 / 2] with queries [q, 1]: the score
    q.t - |t|^2 / 2 orders rows as -|q - t|^2 does, and |q - t|^2 = |q|^2 - 2 score.
    """
    index = TorchIndex(train.shape[1] + 1, device=str(train.device))
    index.add(torch.cat([train, -0.5 * (train * train).sum(1, keepdim=True)], dim=1))
    scores, ids = index.search(torch.cat([queries, queries.new_ones(queries.shape[0], 1)], dim=1), k)
    scores, ids = scores.to(queries.device), ids.to(queries.device)
    return ((queries * queries).sum(1, keepdim=True) - 2 * scores).clamp_min(0), ids


def knn_vote(labels: torch.Tensor, distances: torch.Tensor, num_classes: int, vote: str = "uniform",
             temperature: float = 0.07) -> torch.Tensor:
    """Class votes of neighbours labels (Q, k) with squared distances (Q, k) -> predictions (Q,).

    uniform: one vote each (sklearn's KNeighborsClassifier; ties go to the smallest label).
    weighted: exp(-d^2 / (2 T)), which for unit rows is exp(cos / T) up to a constant (DINO's kNN).
    """
    if vote == "uniform":
        weights = torch.ones_like(distances)
    elif vote == "weighted":
        weights = torch.exp(-(distances - distances[:, :1]) / (2 * temperature))  # nearest gets weight 1
    else:
        raise ConfigError(f"knn.vote={vote!r}; choose one of {VOTES}")
    scores = torch.zeros(labels.shape[0], num_classes, dtype=weights.dtype, device=labels.device)
    scores.scatter_add_(1, labels, weights)  # (Q, C)
    return scores.argmax(1)


def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 20, vote: str = "uniform", temperature: float = 0.07) -> torch.Tensor:
    """Predicted classes (Q,) of queries (Q, D) from labelled train rows (N, D)."""
    distances, ids = knn_search(train, queries, min(k, train.shape[0]))
    return knn_vote(train_labels[ids], distances, num_classes, vote, temperature)


def classification_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy and mean per-class accuracy (recall averaged over the classes present)."""
    classes = np.unique(labels)
    recalls = [float((predictions[labels == c] == c).mean()) for c in classes]
    return {"accuracy": float((predictions == labels).mean()), "mean_per_class_accuracy": float(np.mean(recalls))}


def few_shot_indices(labels: np.ndarray, shots: int, rule: str, seed: int = 0) -> np.ndarray:
    """`shots` train rows per class: the first in dataset order (reference) or a seeded random draw."""
    if rule not in FEW_SHOT_RULES:
        raise ConfigError(f"knn.few_shot_rule={rule!r}; choose from {FEW_SHOT_RULES}")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if rule == "random":
            members = rng.permutation(members)
        chosen.append(members[:shots])
    return np.sort(np.concatenate(chosen))



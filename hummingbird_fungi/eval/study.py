"""Feature studies: compose cached feature parts, retrieve once per composition, score each image.

A study extracts, once per image, the token embedding and the projected gradients of several FUNGI
variants (`FungiPatchFeatures.parts`), then scores many compositions of them without a new forward
pass: which gradients are concatenated, their weight w, how many projected coordinates each keeps,
an optional PCA (with whitening) fitted on the memory rows, and k and the temperature of label
transfer (one top-k search serves every k <= its own and every temperature). Each (composition, k,
temperature) yields one confusion matrix per query image, so `eval.bootstrap` can put a paired
interval on its difference to the embeddings. The driver is tools/fungi_study.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.eval.metrics import ConfusionMatrix
from hummingbird_fungi.features.fungi_patch import combine
from hummingbird_fungi.retrieval.indexes import build_index
from hummingbird_fungi.retrieval.transfer import patch_probs_to_map, upsample_argmax, vote


@dataclass(frozen=True)
class Composition:
    """One study row's feature: normalise([x̂ ; w φ̂_1 ; ... ]) of the named gradient parts, optionally PCA'd."""

    name: str
    grads: tuple[str, ...] = ()  # () = the plain embeddings
    weight: float = 1.0
    dims: int | None = None  # keep the first `dims` projected coordinates of each gradient
    pca: int | None = None
    whiten: bool = False


def parse_composition(text: str) -> Composition:
    """'NAME' (embeddings) or 'NAME:grads=a+b,w=0.5,dims=96,pca=256,whiten' -> Composition."""
    name, _, spec = text.partition(":")
    values: dict = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key == "grads":
            values["grads"] = tuple(filter(None, value.split("+")))
        elif key == "w":
            values["weight"] = float(value)
        elif key in ("dims", "pca"):
            values[key] = int(value)
        elif key == "whiten":
            values["whiten"] = value in ("", "1", "true")
        else:
            raise ConfigError(f"composition {text!r}: unknown key {key!r} (grads, w, dims, pca, whiten)")
    if not name:
        raise ConfigError(f"composition {text!r} has no name")
    if values.get("whiten") and not values.get("pca"):
        raise ConfigError(f"composition {text!r}: whiten needs pca=N")
    return Composition(name, **values)


def compose(tokens: Tensor, grads: Sequence[Tensor], composition: Composition) -> Tensor:
    """Unit features (n, D) from tokens (n, E) and the composition's gradient parts [(n, P_i)] (PCA not applied)."""
    if not composition.grads:
        return F.normalize(tokens.float(), dim=-1)
    parts = [g[:, :composition.dims] if composition.dims else g for g in grads]
    return combine(tokens, parts, composition.weight)


class Pca:
    """PCA of unit rows fitted on the memory rows: x -> normalise((x - mean) V[:, :d] (/ sqrt(eigenvalue)))."""

    def __init__(self, rows: Tensor, dims: int, whiten: bool = False, max_rows: int = 200_000, seed: int = 0) -> None:
        if not 1 <= dims <= rows.shape[1]:
            raise ConfigError(f"pca={dims} must lie in [1, {rows.shape[1]}] (the feature size)")
        if rows.shape[0] > max_rows:  # the covariance of a seeded sample
            rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]]
        rows = rows.double()
        self.mean = rows.mean(0)  # (D,)
        centred = rows - self.mean
        eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred / max(len(rows) - 1, 1))  # ascending
        self.basis = vectors[:, -dims:].flip(1)  # (D, d), largest first
        self.scale = eigenvalues[-dims:].flip(0).clamp_min(1e-12).rsqrt() if whiten else None  # (d,)

    def __call__(self, x: Tensor) -> Tensor:
        """(n, D) -> (n, d) unit rows."""
        out = (x.double() - self.mean) @ self.basis
        if self.scale is not None:
            out = out * self.scale
        return F.normalize(out.float(), dim=-1)


def search(queries: Tensor, memory: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact cosine top-k of unit rows: (Q, D), (M, D) -> similarities (Q, k) and ids (Q, k)."""
    index = build_index("torch", memory.shape[1], device="cpu")
    index.add(memory)
    return index.search(queries, min(k, memory.shape[0]))


def transfer_probs(sims: Tensor, ids: Tensor, labels: Tensor, k: int, temperature: float) -> Tensor:
    """Label transfer from a top-K answer (Q, K) with K >= k: soft labels (M, C) -> class distributions (Q, C)."""
    if k > sims.shape[1]:
        raise ConfigError(f"k={k} exceeds the {sims.shape[1]} neighbours searched")
    return vote(sims[:, :k], labels[ids[:, :k]].float(), temperature)


def image_confusions(probs: Tensor, grid: tuple[int, int], targets: Iterable[Tensor | np.ndarray],
                     num_classes: int, ignore_index: int | None, class_chunk: int = 32) -> np.ndarray:
    """Per-image (C, C) confusion matrices (N, C, C) of patch distributions (N h w, C) upsampled to each target."""
    per_image = grid[0] * grid[1]
    matrices = []
    for i, target in enumerate(targets):
        target = torch.as_tensor(np.asarray(target)).long()
        pred = upsample_argmax(patch_probs_to_map(probs[i * per_image:(i + 1) * per_image], grid),
                               tuple(target.shape), class_chunk)
        cm = ConfusionMatrix(num_classes, ignore_index)
        cm.update(pred, target)
        matrices.append(cm.matrix.numpy())
    return np.stack(matrices)

"""The interface every patch feature extractor implements (embeddings, FUNGI, ...)."""

from __future__ import annotations

import abc
import logging
from typing import Any, Sequence

import torch

from hummingbird_fungi.errors import DataError
from hummingbird_fungi.models.encoders import Encoder

log = logging.getLogger(__name__)


class PatchFeatures(abc.ABC):
    """Maps a batch of images to one L2-normalised feature per patch.

    `select` lets the memory-bank builder ask only for the patches it keeps, so
    extractors whose per-patch cost is high (FUNGI projections) skip the rest.
    """

    kind: str = ""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Feature dimension D."""

    @property
    def needs_support(self) -> bool:
        """Whether `set_support` must be called before extraction (FUNGI negatives)."""
        return False

    def set_support(self, features: torch.Tensor, image_ids: torch.Tensor | None = None) -> None:
        """Give the extractor a support set of raw patch embeddings (M, E), unit rows, from images `image_ids` (M,)."""
        raise NotImplementedError(f"{self.kind} features take no support set")

    def support_arrays(self) -> dict[str, Any]:
        """The support set as arrays to save with a bank (name -> array); empty when there is none."""
        return {}

    def options(self) -> dict[str, Any]:
        """Options that change the features; recorded in bank manifests."""
        return {}

    def manifest(self) -> dict[str, Any]:
        """Everything a memory bank and its queries must agree on."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "backbone": self.encoder.name,
            "architecture": self.encoder.architecture,
            "weights": self.encoder.weights_id,
            "options": self.options(),
        }

    @abc.abstractmethod
    def __call__(self, images: torch.Tensor, select: torch.Tensor | None = None,
                 image_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, N, D) features, or (B, n, D) for `select` (B, n) patch ids.

        `image_ids` (B,) are the images' dataset indices, for features that look at other
        images of the same dataset (FUNGI support negatives skip the query's own image).
        """


def select_patches(features: torch.Tensor, select: torch.Tensor | None) -> torch.Tensor:
    """Gather rows `select` (B, n) from per-patch features (B, N, D) -> (B, n, D)."""
    if select is None:
        return features
    index = select.to(features.device).unsqueeze(-1).expand(-1, -1, features.shape[-1])
    return torch.gather(features, 1, index)


def finite_rows(features: torch.Tensor, names: Sequence[str], what: str, policy: str = "error") -> torch.Tensor:
    """(B, n) bool: which rows of (B, n, D) `features` hold only finite values. Rows with NaN or inf are refused
    (DataError naming the images `names` (B,)) or, with `policy` 'drop' (`features.non_finite`), counted in a
    warning and left for the caller to drop."""
    keep = torch.isfinite(features).all(-1)
    if bool(keep.all()):
        return keep
    counts = (~keep).sum(-1).tolist()
    images = [f"{name}: {count} of {keep.shape[1]} rows" for name, count in zip(names, counts) if count]
    message = (f"NaN or inf in {sum(counts)} {what} rows of {len(images)} images ({'; '.join(images[:5])}"
               f"{'; ...' if len(images) > 5 else ''})")
    if policy != "drop":
        raise DataError(f"{message}; the model overflowed (e.g. in fp16/bf16 autocast) or the input is broken; "
                        f"features.non_finite=drop leaves such rows out")
    log.warning("%s: dropped (features.non_finite=drop)", message)
    return keep

"""Patch features: the interface (`PatchFeatures`), plain embeddings, patch and image FUNGI, their
losses, gradient capture and projections, the on-disk feature cache, and the PCA / whitening fitted
on the memory rows (`features.pca`, `features.transform`).

`build_patch_features(kind, encoder, options)` creates the extractor named by `features.kind`.
"""

from __future__ import annotations

from typing import Any

from hummingbird_fungi.config.schema import FungiOptions
from hummingbird_fungi.features.base import PatchFeatures
from hummingbird_fungi.features.embeddings import EmbeddingFeatures
from hummingbird_fungi.features.fungi_patch import FungiPatchFeatures
from hummingbird_fungi.models.encoders import Encoder
from hummingbird_fungi.registry import Registry

PATCH_FEATURES: Registry[type[PatchFeatures]] = Registry("features.kind")
PATCH_FEATURES.register("embeddings")(EmbeddingFeatures)
PATCH_FEATURES.register("fungi")(FungiPatchFeatures)


def build_patch_features(kind: str, encoder: Encoder, options: FungiOptions | dict[str, Any] | None = None
                         ) -> PatchFeatures:
    """The patch feature extractor `kind` on `encoder`; `options` only for kinds that take them (fungi)."""
    factory = PATCH_FEATURES.get(kind)
    if factory is EmbeddingFeatures:
        return EmbeddingFeatures(encoder)
    if isinstance(options, dict):
        return factory(encoder, **options)
    return factory(encoder, options)


__all__ = ["PATCH_FEATURES", "PatchFeatures", "EmbeddingFeatures", "FungiPatchFeatures", "build_patch_features"]

"""Feature extractors, looked up by kind (`features.kind` in configs)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.features.base import PatchFeatures
from hummingbird_fungi.features.embeddings import EmbeddingFeatures

if TYPE_CHECKING:
    from hummingbird_fungi.models.backbones import Backbone

_REGISTRY: dict[str, Callable[..., PatchFeatures]] = {"embeddings": EmbeddingFeatures}


def register(kind: str, factory: Callable[..., PatchFeatures]) -> None:
    """Make a feature extractor available under `kind`."""
    _REGISTRY[kind] = factory


def build_patch_features(kind: str, backbone: "Backbone", options: dict[str, Any] | None = None) -> PatchFeatures:
    """Create the patch feature extractor `kind` on `backbone` with its options."""
    if kind not in _REGISTRY:
        raise ConfigError(f"unknown features.kind {kind!r}; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[kind](backbone, **(options or {}))


__all__ = ["PatchFeatures", "EmbeddingFeatures", "build_patch_features", "register"]

from hummingbird_fungi.features.fungi_patch import FungiPatchFeatures  # noqa: E402

register("fungi", FungiPatchFeatures)

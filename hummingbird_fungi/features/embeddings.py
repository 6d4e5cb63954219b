"""Plain patch embeddings: the backbone's last-layer patch tokens, L2-normalised."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hummingbird_fungi.features.base import PatchFeatures, select_patches


class EmbeddingFeatures(PatchFeatures):
    """The Hummingbird baseline feature: last-layer tokens after the final norm."""

    kind = "embeddings"

    @property
    def dim(self) -> int:
        return self.encoder.embed_dim

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, select: torch.Tensor | None = None,
                 image_ids: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.encoder(images)  # (B, N, E)
        return F.normalize(select_patches(tokens.float(), select), dim=-1)

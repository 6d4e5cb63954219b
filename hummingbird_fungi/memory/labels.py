"""Per-patch labels of a mask: class histograms (soft labels) and which patches a bounded bank keeps.

The label-aware rule prefers patches of classes that cover few patches of their image
(docs/protocol.md#label-aware-sampling); `patches_per_image` is the n_img of a bounded bank and
`bank_patches` the seeded draw of an image's kept patches (the builder, `subsample_bank` and the
feature study all call it, so their banks hold the same rows).
"""

from __future__ import annotations

import logging

import torch

from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.runtime import generator

log = logging.getLogger(__name__)

EMPTY_PATCH_SCORE = 1e6


def patchify_labels(mask: torch.Tensor, patch: int, num_classes: int,
                    void_to_background: bool) -> torch.Tensor:
    """Per-patch class counts: (B, H, W) int ids -> (B, N, C) float32, row-major patches.

    Ids outside [0, C) are void: counted as class 0 if `void_to_background` (the
    reference's VOC rule 255 -> 0), else left out of the histogram.
    """
    batch, height, width = mask.shape
    h, w = height // patch, width // patch
    valid = (mask >= 0) & (mask < num_classes)
    ids = torch.where(valid, mask, torch.zeros_like(mask))
    weight = (valid | void_to_background).float()
    # (B, H, W) -> (B, h, p, w, p) -> (B, h, w, p*p)
    ids = ids.reshape(batch, h, patch, w, patch).permute(0, 1, 3, 2, 4).reshape(batch, h * w, patch * patch)
    weight = weight.reshape(batch, h, patch, w, patch).permute(0, 1, 3, 2, 4).reshape(batch, h * w, patch * patch)
    counts = torch.zeros(batch, h * w, num_classes)
    counts.scatter_add_(2, ids.long(), weight)  # (B, N, C)
    return counts


def soft_labels(counts: torch.Tensor) -> torch.Tensor:
    """Normalise per-patch class counts (…, C) to histograms summing to 1 (all-void rows stay 0)."""
    total = counts.sum(-1, keepdim=True)
    return counts / total.clamp_min(1e-12)


def label_aware_scores(counts: torch.Tensor) -> torch.Tensor:
    """The label-aware rarity score of each patch of one image: (N, C) counts -> (N,) rarity scores (smaller = keep)."""
    present = (counts > 0).float()  # (N, C)
    freq = present.sum(0)  # (C,) patches of this image containing each class
    score = present @ freq  # (N,)
    return torch.where(present.sum(1) > 0, score, torch.full_like(score, EMPTY_PATCH_SCORE))


def sample_patches(counts: torch.Tensor, n: int, rule: str, generator: torch.Generator) -> torch.Tensor:
    """Choose `n` patch ids of one image from its (N, C) counts by `rule` -> (n,) sorted int64."""
    num_patches = counts.shape[0]
    noise = torch.rand(num_patches, generator=generator)
    if rule == "label_aware":
        score = label_aware_scores(counts) * noise
    elif rule == "uniform":
        score = noise
    else:
        raise ConfigError(f"unknown memory.sampling {rule!r}; choose label_aware or uniform")
    keep = torch.topk(score, n, largest=False).indices
    return keep.sort().values


def bank_patches(counts: torch.Tensor, n: int, rule: str, seed: int, epoch: int, index: int) -> torch.Tensor:
    """The `n` patch ids (n,) sorted that a bank of run seed `seed` keeps of image `index` at `epoch`, from its
    (N, C) counts: `sample_patches` drawn from generator(seed + 1, epoch, index), so a draw depends on nothing else."""
    return sample_patches(counts, n, rule, generator(seed + 1, epoch, index))


def patches_per_image(memory_size: int | None, num_images: int, epochs: int, num_patches: int) -> int:
    """Rows each image contributes: n_img = size // (images x epochs), clamped to [1, N]."""
    if memory_size is None:
        return num_patches
    n_img = memory_size // max(num_images * epochs, 1)
    if n_img < 1:
        log.warning("memory.size %d < images x epochs (%d); keeping 1 patch per image",
                    memory_size, num_images * epochs)
    if n_img > num_patches:
        log.warning("memory.size %d asks %d patches per image but images have only %d; keeping all",
                    memory_size, n_img, num_patches)
    return min(max(n_img, 1), num_patches)

"""Patch-level FUNGI features (docs/protocol.md#patch-fungi): last-layer token + random projection of its
own loss gradient.

Per image: a seeded, never-trained head fc (E -> head_dim) maps all last-layer tokens
(prefix tokens included, as in the reference: CLS and any register tokens act as positives
and query negatives, but get no feature) to z; the reference's InfoNCE (with its
fp16 numerics fixed) pulls every token towards the other tokens of its image and,
optionally, away from retrieved support negatives. Two per-patch objectives are ours
(`objective`): kl (each patch's softmax(z / T) against the uniform distribution) and dino (each
patch's softmax(z / T_s) against the centred, sharpened head output of the same patch in the
mirrored image: self-distillation between two views with an exact patch correspondence). The
gradient of that loss at a linear layer (default: the encoder's patch layer, the last block's attn.qkv
on ViTs; the reference's is attn.proj; weight and bias) is taken per patch as the
outer product g_t [a_t; 1]^T and projected without being formed (projection.py). The
feature is normalise([x̂_t ; w φ̂_t]) (w = grad_weight, 1 in the reference).

Deviations from the reference, each with a switch:
* negatives default to `none`: with the temperature on the positive term only, retrieved
  negatives barely move the gradients (per-token cosine 0.9998 without any) while the
  support search is the costliest step after the forward pass; `support` uses real support
  neighbours and `support_scrambled` reproduces the reference's reshape bug
  (docs/protocol.md#reference-bugs-we-can-reproduce).
* support negatives skip rows of the query's own image when image ids are known
  (`exclude_same_image`; the reference keeps them: near-duplicates of the token itself).
* the projection defaults to `structured` (rank 4), measured to match the dense +-1 P in
  gradient-cosine fidelity (RMS error of pairwise patch cosines on DINOv2-S: 0.054 vs 0.045)
  and mIoU at 1/50-1/200 of its cost; `dense` is the reference's P.
* the negative keep-mask of each image is drawn from a fresh generator seeded by `neg_seed`
  (so it is the same mask for every image) and the loss is summed over images, not
  averaged: an image's features do not depend on the rest of its batch.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hummingbird_fungi.config.schema import FungiOptions
from hummingbird_fungi.config.typed import with_overrides
from hummingbird_fungi.features.base import PatchFeatures, select_patches
from hummingbird_fungi.features.gradients import forward_with_capture, gradient_layer, random_head
from hummingbird_fungi.features.losses import dino_loss, info_nce, kl_uniform_loss
from hummingbird_fungi.features.projection import build_projection
from hummingbird_fungi.models.encoders import Encoder
from hummingbird_fungi.registry import Registry
from hummingbird_fungi.retrieval.indexes import merge_topk, row_slices
from hummingbird_fungi.runtime import autocast, bf16_matmuls, native_bf16_matmul, timed, use_autocast

log = logging.getLogger(__name__)

SUPPORT_CHUNK = 16384  # support rows scored at a time per image (a 64 MB block for 1024 tokens)


def gather_negatives(support: Tensor, ids: Tensor, n_neg: int, scrambled: bool = False) -> Tensor:
    """Support rows (M, E) of each token's neighbours ids (B, T, K) -> (B, T, n_neg, E).

    `scrambled` copies the reference's reshape bug: the (K, E) block of a token
    is read as (E, K) and transposed, interleaving coordinates of several neighbours.
    """
    batch, tokens, k = ids.shape
    rows = support[ids.reshape(-1)]  # (B T K, E)
    if scrambled:
        rows = rows.reshape(batch, tokens, -1, k).permute(0, 1, 3, 2)  # (B, T, K, E), scrambled
    else:
        rows = rows.reshape(batch, tokens, k, -1)  # (B, T, K, E)
    return rows[:, :, :n_neg]


def keep_mask(count: int, keep_prob: float, seed: int, device: torch.device) -> Tensor:
    """The reference's negative keep-mask (rand <= p) for one image's `count` candidates -> (count,) bool."""
    if keep_prob >= 1.0:
        return torch.ones(count, dtype=torch.bool, device=device)
    draws = torch.rand(count, generator=torch.Generator().manual_seed(seed))
    return (draws <= keep_prob).to(device)


def combine(tokens: Tensor, phi: Tensor | Sequence[Tensor], grad_weight: float) -> Tensor:
    """The FUNGI feature normalise([x̂ ; w φ̂]) for tokens (..., E) and projections (..., P) -> (..., E + P).

    `phi` may be several projected gradients [(..., P_i)]: each is normalised and weighted on its own.
    """
    phis = [phi] if isinstance(phi, Tensor) else list(phi)
    parts = [F.normalize(tokens.float(), dim=-1)] + [grad_weight * F.normalize(p.float(), dim=-1) for p in phis]
    return F.normalize(torch.cat(parts, dim=-1), dim=-1)


class PatchObjective(abc.ABC):
    """A per-image loss on the random head's outputs of an image's tokens (`features.fungi.objective`)."""

    name: str = ""

    def __init__(self, options: FungiOptions) -> None:
        self.settings = options

    @abc.abstractmethod
    def loss(self, features: FungiPatchFeatures, z: Tensor, images: Tensor, negatives: Tensor | None,
             keep: Tensor | None) -> Tensor:
        """The loss summed over images (and tokens) for the head outputs z (B, T, L) of `images`' tokens."""


class InfoNCEPatchObjective(PatchObjective):
    """The reference's InfoNCE: tokens attract the other tokens of their image (and repel support negatives)."""

    name = "infonce"

    def loss(self, features: FungiPatchFeatures, z: Tensor, images: Tensor, negatives: Tensor | None,
             keep: Tensor | None) -> Tensor:
        return info_nce(z, self.settings.tau, self.settings.tau_placement, negatives, keep).sum()


class KLPatchObjective(PatchObjective):
    """Each patch's softmax(z / T) against the uniform distribution."""

    name = "kl"

    def loss(self, features: FungiPatchFeatures, z: Tensor, images: Tensor, negatives: Tensor | None,
             keep: Tensor | None) -> Tensor:
        return kl_uniform_loss(z.flatten(0, 1), self.settings.kl_temperature).sum()


class DinoPatchObjective(PatchObjective):
    """Each patch against the centred, sharpened head output of the same patch in the mirrored image."""

    name = "dino"

    def loss(self, features: FungiPatchFeatures, z: Tensor, images: Tensor, negatives: Tensor | None,
             keep: Tensor | None) -> Tensor:
        teacher = features.head(self.mirrored_tokens(features, images))  # (B, T, L)
        teacher = teacher - teacher.mean(1, keepdim=True)  # centred over the image's tokens
        return dino_loss(z.flatten(0, 1)[:, None], teacher.flatten(0, 1)[:, None],
                         self.settings.student_temperature, self.settings.teacher_temperature).sum()

    @staticmethod
    def mirrored_tokens(features: FungiPatchFeatures, images: Tensor) -> Tensor:
        """Tokens (B, T, E) of the horizontally mirrored images, patches mirrored back onto the original grid."""
        encoder = features.encoder
        with torch.no_grad(), autocast(features.autocast, images.device):
            tokens = encoder.forward_tokens(images.flip(-1)).float()  # (B, T, E)
        prefix = encoder.num_prefix_tokens
        h, w = encoder.grid_size(images.shape[-2], images.shape[-1])
        patches = tokens[:, prefix:].reshape(len(tokens), h, w, -1).flip(2).reshape(len(tokens), h * w, -1)
        return torch.cat([tokens[:, :prefix], patches], dim=1)


PATCH_OBJECTIVES: Registry[type[PatchObjective]] = Registry("patch FUNGI objective")
for _cls in (InfoNCEPatchObjective, KLPatchObjective, DinoPatchObjective):
    PATCH_OBJECTIVES.register(_cls.name)(_cls)


class FungiPatchFeatures(PatchFeatures):
    """FUNGI per-patch features: [token ; projected per-token loss gradient], unit rows."""

    kind = "fungi"

    def __init__(self, encoder: Encoder, options: FungiOptions | None = None, **overrides: Any) -> None:
        super().__init__(encoder)
        self.settings = with_overrides(FungiOptions, options, overrides)
        opts = self.settings
        self.head_dim, self.head_seed = opts.head_dim, opts.head_seed
        self.objective = PATCH_OBJECTIVES.get(opts.objective)(opts)
        self.negatives, self.neg_k, self.n_neg = opts.negatives, opts.neg_k, opts.n_neg
        self.keep_prob, self.neg_seed, self.exclude_same_image = opts.keep_prob, opts.neg_seed, opts.exclude_same_image
        self.grad_weight, self.autocast, self.token_chunk = opts.grad_weight, opts.autocast, opts.token_chunk
        self.layer_path, self.layer = gradient_layer(encoder, opts.layer, patch=True)
        self.head_weight, self.head_bias = random_head(encoder.embed_dim, opts.head_dim, opts.head_seed)
        proj_options: dict[str, Any] = ({"rank": opts.rank, "distribution": opts.projection_distribution}
                                        if opts.projection == "structured" else {})
        self.projection = build_projection(opts.projection, opts.out_dim or encoder.embed_dim, self.layer.out_features,
                                           self.layer.in_features, opts.projection_seed,
                                           token_chunk=opts.token_chunk, **proj_options)
        self._support: Tensor | None = None  # (M, E) unit rows, on the device of the last call
        self._support_images: Tensor | None = None  # (M,) dataset index of each support row
        self.step_times: dict[str, float] | None = None  # set to {} to accumulate seconds per step

    @property
    def dim(self) -> int:
        return self.encoder.embed_dim + self.projection.out_dim

    @property
    def needs_support(self) -> bool:
        return self.negatives != "none"  # only the infonce objective takes negatives (FungiOptions checks)

    def set_support(self, features: Tensor, image_ids: Tensor | None = None) -> None:
        """Index the support set (M, E) of raw unit-norm patch embeddings that supplies negatives.

        `image_ids` (M,) name each row's image, so that a query image's own rows can be skipped.
        """
        features = torch.as_tensor(features)
        if features.ndim != 2 or features.shape[1] != self.encoder.embed_dim:
            raise ValueError(f"support features must be (M, {self.encoder.embed_dim}), got {tuple(features.shape)}")
        if image_ids is not None and tuple(image_ids.shape) != tuple(features.shape[:1]):
            raise ValueError(f"support image ids must be ({features.shape[0]},), got {tuple(image_ids.shape)}")
        self._support = features.float()
        self._support_images = None if image_ids is None else torch.as_tensor(image_ids, dtype=torch.int64)
        log.info("fungi support set: %d rows", self._support.shape[0])

    def support_arrays(self) -> dict[str, Any]:
        if self._support is None:
            return {}
        arrays = {"support_features": self._support.cpu().numpy()}
        if self._support_images is not None:
            arrays["support_images"] = self._support_images.numpy()
        return arrays

    def options(self) -> dict[str, Any]:
        return {**self.settings.to_dict(), "layer": self.layer_path}

    def __call__(self, images: Tensor, select: Tensor | None = None, image_ids: Tensor | None = None) -> Tensor:
        tokens, phi = self.parts(images, select, image_ids)
        return combine(tokens, phi, self.grad_weight)  # (B, n, E + P)

    def parts(self, images: Tensor, select: Tensor | None = None,
              image_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The two halves before they are combined: tokens (B, n, E) and projected gradients (B, n, P)."""
        with torch.inference_mode(False), torch.enable_grad():
            images = images.clone() if images.is_inference() else images
            g, a, tokens = self._gradients(images, image_ids)  # (B, T, E_out), (B, T, E_in), (B, T, E)
            prefix = self.encoder.num_prefix_tokens
            g, a, tokens = (select_patches(t[:, prefix:], select) for t in (g, a, tokens))  # (B, n, .)
            with timed(self.step_times, "projection"):
                return tokens, self._project(g, a)  # (B, n, P)

    def _gradients(self, images: Tensor, image_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Layer output-gradients g, layer inputs a and final tokens for all tokens of each image."""
        with timed(self.step_times, "forward"), autocast(self.autocast, images.device):
            capture = forward_with_capture(self.encoder.forward_tokens, self.layer, images)
        tokens = capture.tokens.float()  # (B, T, E)
        with timed(self.step_times, "negatives"):
            negatives, keep = self._negatives(tokens.detach(), image_ids)
        with timed(self.step_times, "loss_backward"):
            loss = self.objective.loss(self, self.head(tokens), images, negatives, keep)
            with bf16_matmuls(images.device) if self._bf16(images.device) else contextlib.nullcontext():
                (g,) = torch.autograd.grad(loss, capture.output)
        return g.detach(), capture.input, tokens.detach()

    def _negatives(self, tokens: Tensor, image_ids: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """Projected support negatives (B, T n_neg, L) and their keep-mask (B, T n_neg), or (None, None)."""
        if self.negatives == "none":
            return None, None
        if self._support is None:
            raise RuntimeError("fungi negatives need a support set: call set_support(features) first")
        batch, count, dim = tokens.shape
        if self._support.device != tokens.device:
            self._support = self._support.to(tokens.device)
        exclude = self.exclude_same_image and image_ids is not None and self._support_images is not None
        ids = self._neighbours(F.normalize(tokens, dim=-1), torch.as_tensor(image_ids) if exclude else None)
        rows = gather_negatives(self._support, ids, self.n_neg, self.negatives == "support_scrambled")
        rows = rows.reshape(batch, count * self.n_neg, dim)  # (B, T n_neg, E), token-major as the reference
        negatives = self.head(rows)  # (B, T n_neg, L)
        keep = keep_mask(count * self.n_neg, self.keep_prob, self.neg_seed, tokens.device)
        return negatives, keep.expand(batch, -1)

    def _neighbours(self, queries: Tensor, image_ids: Tensor | None = None) -> Tensor:
        """Ids (B, T, neg_k) of the support rows nearest to unit queries (B, T, E) by exact cosine, best first;
        with image ids (B,), rows of the query's own image come last (masked before the top-k)."""
        support, k = self._support, min(self.neg_k, len(self._support))
        own = None if image_ids is None else (self._support_images.to(queries.device)[None]
                                              == image_ids.to(queries.device).view(-1, 1))  # (B, M)
        ids = []
        for b in range(len(queries)):
            best = None
            for rows in row_slices(len(support), SUPPORT_CHUNK):
                scores = queries[b] @ support[rows].T  # (T, m)
                if own is not None:
                    scores.masked_fill_(own[b, rows], float("-inf"))
                top, where = scores.topk(min(k, scores.shape[1]), dim=1)
                best = merge_topk(best, (top, where + rows.start), k)
            ids.append(best[1])
        return torch.stack(ids)  # (B, T, k)

    def head(self, x: Tensor) -> Tensor:
        """The random head fc on rows x (..., E) -> (..., L)."""
        if self.head_weight.device != x.device:
            self.head_weight, self.head_bias = self.head_weight.to(x.device), self.head_bias.to(x.device)
        return x @ self.head_weight.T + self.head_bias

    def _bf16(self, device: torch.device) -> bool:
        """Whether the gradient half's matmuls run in bf16 on `device` (`gradient_dtype`)."""
        choice = self.settings.gradient_dtype
        return choice == "bfloat16" or (choice == "auto" and (use_autocast(self.autocast, device)
                                                             or native_bf16_matmul(device)))

    def _project(self, g: Tensor, a: Tensor) -> Tensor:
        """Project per-token gradients g (B, n, E_out), a (B, n, E_in) -> (B, n, P) fp32, in `gradient_dtype`."""
        dtype = torch.bfloat16 if self._bf16(g.device) else torch.float32
        g, a = g.to(dtype), a.to(dtype)  # a bf16 cast is the one copy: the flatten below is then a view
        phi = self.projection.project_outer(g.flatten(0, 1), a.flatten(0, 1))  # (B n, P)
        return phi.view(*g.shape[:2], self.projection.out_dim)

"""The pipeline's feature transform (`features.transform`): a PCA fitted on the memory rows, optionally
whitening, applied to bank rows as they are read and to query features (docs/protocol.md#feature-transform).

`FeatureTransform` is fitted on a seeded sample of raw memory rows (no labels, no extra forward) and
maps rows (..., D) to unit rows (..., d), since retrieval ranks by cosine. Its `recipe` (the options,
the seed of the sample, the rows fitted on and the sizes) is saved beside its arrays; `transform_key`,
a short hash of the options and the seed, names the folder where a bank stores it. `TransformedFeatures`
applies it after any patch feature extractor, so queries land in the space of the transformed bank.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hummingbird_fungi.config.schema import TransformOptions
from hummingbird_fungi.errors import ConfigError, DataError
from hummingbird_fungi.features.base import PatchFeatures
from hummingbird_fungi.features.pca import Pca
from hummingbird_fungi.runtime import sample_ids

log = logging.getLogger(__name__)

FITTED_KEYS = ("fitted_rows", "input_dim", "dim")  # what a recipe records of the fit besides its identity
ARRAY_NAMES = ("transform_mean", "transform_axes", "transform_scale")  # the fitted arrays, as saved


def transform_identity(options: TransformOptions, seed: int) -> dict[str, Any]:
    """What decides a fit on a given bank: the options and the seed of the row sample."""
    return {**options.to_dict(), "seed": seed}


def transform_key(identity: Mapping[str, Any]) -> str:
    """12 hex digits of the SHA-256 of an identity (`transform_identity`): the name of a stored transform."""
    return hashlib.sha256(json.dumps(dict(identity), sort_keys=True).encode()).hexdigest()[:12]


def recipe_identity(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The identity (options and seed) of a recipe: all but what it records of the fit."""
    return {name: value for name, value in recipe.items() if name not in FITTED_KEYS}


class FeatureTransform:
    """Raw feature rows (..., D) -> unit rows (..., d) through a fitted `Pca`; `recipe` says how it was fitted."""

    def __init__(self, pca: Pca, recipe: dict[str, Any]) -> None:
        self.pca, self.recipe = pca, recipe

    @classmethod
    def fit(cls, rows: Tensor, options: TransformOptions, seed: int) -> "FeatureTransform":
        """Fit on raw rows (n, D), a sample of the memory drawn with `seed`. Whitened, at most n - 1 axes are kept
        (the rank of n centred rows: further axes have no variance and whitening would blow up their noise)."""
        count, width = rows.shape
        dims = width if options.dims is None else options.dims
        if dims > width:
            raise ConfigError(f"features.transform.dims={dims} exceeds the feature size {width}")
        if options.whiten and dims > count - 1:
            if count < 2:
                raise DataError(f"cannot whiten features with a PCA fitted on {count} memory row")
            (log.warning if options.dims is not None else log.info)(
                "whitening %d axes of %d-dimensional features fitted on %d rows: keeping the %d axes they span",
                dims, width, count, count - 1)
            dims = count - 1
        pca = Pca.fit(rows, dims, options.whiten, epsilon=options.epsilon, shrinkage=options.shrinkage)
        return cls(pca, {**transform_identity(options, seed), "fitted_rows": count, "input_dim": width, "dim": dims})

    @classmethod
    def fit_sample(cls, rows: Tensor, options: TransformOptions, seed: int) -> "FeatureTransform":
        """Fit on a uniform sample of `options.fit_rows` of raw rows (n, D) in memory, drawn with `seed` as
        `MemoryBank.sample_features` draws a bank's rows."""
        return cls.fit(rows[sample_ids(len(rows), options.fit_rows, seed)].float(), options, seed)

    @property
    def dim(self) -> int:
        """Output dimension d."""
        return int(self.pca.axes.shape[1])

    def __call__(self, x: Tensor) -> Tensor:
        """Rows (..., D) -> unit rows (..., d) float32, computed in float32 on x's device."""
        flat = x.reshape(-1, x.shape[-1]).float()
        return F.normalize(self.pca(flat, torch.float32), dim=-1).reshape(*x.shape[:-1], self.dim)

    def arrays(self) -> dict[str, np.ndarray]:
        """The fitted arrays, float64: transform_mean (D,), transform_axes (D, d), transform_scale (d,) when
        whitening."""
        parts = dict(zip(ARRAY_NAMES, (self.pca.mean, self.pca.axes, self.pca.scale)))
        return {name: part.cpu().numpy() for name, part in parts.items() if part is not None}

    @classmethod
    def from_arrays(cls, recipe: Mapping[str, Any], arrays: Mapping[str, np.ndarray], where: str
                    ) -> "FeatureTransform":
        """The transform of `recipe` from its `arrays` (as `arrays` names them); a missing array or a shape other
        than the recipe's sizes is a DataError naming `where` (the bank)."""
        try:
            width, dims, whiten = recipe["input_dim"], recipe["dim"], recipe["whiten"]
        except (KeyError, TypeError) as exc:
            raise DataError(f"the feature transform of {where} records no {exc} in its recipe: damaged, or not "
                            f"written by this toolkit") from exc
        mean, axes, scale = ARRAY_NAMES
        shapes = {mean: (width,), axes: (width, dims), **({scale: (dims,)} if whiten else {})}
        for name, shape in shapes.items():
            if name not in arrays:
                raise DataError(f"the feature transform of {where} lacks {name}")
            if tuple(arrays[name].shape) != shape:
                raise DataError(f"the feature transform of {where}: {name} has shape {tuple(arrays[name].shape)} "
                                f"where its recipe says {shape}: damaged or edited")
        pca = Pca(*(torch.from_numpy(np.asarray(arrays[name], dtype=np.float64)) for name in shapes))
        return cls(pca, dict(recipe))


class TransformedFeatures(PatchFeatures):
    """Another extractor's features mapped by a fitted `FeatureTransform`: the queries of a transformed bank."""

    def __init__(self, inner: PatchFeatures, transform: FeatureTransform) -> None:
        super().__init__(inner.encoder)
        self.inner, self.transform, self.kind = inner, transform, inner.kind

    @property
    def dim(self) -> int:
        return self.transform.dim

    @property
    def needs_support(self) -> bool:
        return self.inner.needs_support

    def set_support(self, features: Tensor, image_ids: Tensor | None = None) -> None:
        self.inner.set_support(features, image_ids)

    def support_arrays(self) -> dict[str, Any]:
        return self.inner.support_arrays()

    def options(self) -> dict[str, Any]:
        return self.inner.options()

    def manifest(self) -> dict[str, Any]:
        """The inner extractor's manifest (what the bank's rows are) and the transform's recipe."""
        return {**self.inner.manifest(), "transform": self.transform.recipe}

    def __call__(self, images: Tensor, select: Tensor | None = None, image_ids: Tensor | None = None) -> Tensor:
        return self.transform(self.inner(images, select, image_ids))

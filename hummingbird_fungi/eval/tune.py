"""Tuning on the memory alone: held-out memory images score a grid of features, transforms, k and temperature.

The memory images (a preset's train split, or a user's examples; never the evaluated split) are split
into seeded folds by image. Each image's patch tokens, and the projected gradient of each FUNGI layer of
the grid, are extracted once (plain resize, no augmentation); per fold the other images' rows form the
bank (drawn per image as the builder draws, at most `tune.rows` rows) and the fold's images are the
queries. Every candidate feature (feature kind, FUNGI layer, transform fitted on the fold's bank rows)
costs one exact search per fold, and every (k, temperature) of the grid is answered from it; each image
is held out once, so each grid point gets one confusion matrix per memory image. The best point by
held-out mIoU is chosen; each candidate's best point gets a paired bootstrap interval (over images)
against the run's own setting. docs/protocol.md#tuning-on-the-memory.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from hummingbird_fungi.config.schema import (DataOptions, FeatureOptions, HbirdConfig, MemoryOptions,
                                             RetrievalOptions, TransferOptions, TransformOptions, TuneOptions)
from hummingbird_fungi.data.segmentation import SegmentationDataset, collate
from hummingbird_fungi.data.transforms import EvalTransform
from hummingbird_fungi.errors import ConfigError, DataError
from hummingbird_fungi.eval.bootstrap import compare, dataset_miou, resample_indices
from hummingbird_fungi.eval.hbird import prepare_run
from hummingbird_fungi.eval.study import predict_rows
from hummingbird_fungi.fileio import write_atomic
from hummingbird_fungi.features.fungi_patch import FungiPatchFeatures, combine
from hummingbird_fungi.features.transform import FeatureTransform
from hummingbird_fungi.memory.build import too_few_rows
from hummingbird_fungi.memory.labels import bank_patches, patches_per_image, patchify_labels, soft_labels
from hummingbird_fungi.models.encoders import Encoder
from hummingbird_fungi.retrieval.transfer import Setting

log = logging.getLogger(__name__)

LEAVE_ONE_OUT = 20  # memory images up to which each image is its own fold, whatever tune.folds says


@dataclass(frozen=True)
class Candidate:
    """One feature of the grid: a feature kind (with its FUNGI layer; None: the encoder's default) and a transform."""

    kind: str
    layer: str | None = None
    transform: str = "none"  # none | whiten

    @property
    def name(self) -> str:
        """'embeddings', 'fungi', 'fungi[blocks.-1.attn.proj]+whiten', ..."""
        layer = f"[{self.layer}]" if self.layer else ""
        return f"{self.kind}{layer}" + ("" if self.transform == "none" else f"+{self.transform}")

    def features(self, base: FeatureOptions) -> FeatureOptions:
        """`base` with this candidate's kind, FUNGI layer and transform (whiten: a whitening PCA on every axis)."""
        fungi = dataclasses.replace(base.fungi, layer=self.layer) if self.kind == "fungi" else base.fungi
        transform = (TransformOptions(pca=False) if self.transform == "none" else
                     dataclasses.replace(base.transform, pca=True, whiten=True))
        return dataclasses.replace(base, kind=self.kind, fungi=fungi, transform=transform)


def candidates(options: TuneOptions) -> list[Candidate]:
    """The grid's candidate features: each kind (FUNGI at each layer) with each transform."""
    return [Candidate(kind, layer if kind == "fungi" else None, transform)
            for kind in options.features for layer in (options.layers if kind == "fungi" else [None])
            for transform in options.transforms]


def baseline(features: FeatureOptions) -> Candidate:
    """The candidate a run's own feature options describe."""
    if features.transform.pca and not features.transform.whiten:
        raise ConfigError("tune compares whitened or raw features; features.transform.whiten=false is not tried")
    return Candidate(features.kind, features.fungi.layer if features.kind == "fungi" else None,
                     "whiten" if features.transform.pca else "none")


@dataclass
class Parts:
    """Per memory image: patch tokens (n, N, E), each FUNGI layer's projected gradients (n, N, P), float16, the
    class counts of its patches (n, N, C) and its mask at the input size (n, H, W) int16."""

    tokens: Tensor
    grads: dict[str | None, Tensor]
    counts: Tensor
    masks: Tensor

    def rows(self, candidate: Candidate, grad_weight: float) -> Tensor:
        """The candidate's raw feature rows (n, N, D) before any transform, as its extractor computes them."""
        if candidate.kind == "embeddings":
            return F.normalize(self.tokens.float(), dim=-1)
        return combine(self.tokens, self.grads[candidate.layer], grad_weight)


def extract_parts(dataset: SegmentationDataset, encoder: Encoder, extractors: dict[str | None, FungiPatchFeatures],
                  size: tuple[int, int], data: DataOptions, void_to_background: bool, device: torch.device) -> Parts:
    """Tokens, gradients, patch counts and masks of every image of `dataset` at `size`, plain resize (one pass)."""
    loader = DataLoader(dataset.with_transform(EvalTransform(size, normalize=data.normalize)),
                        batch_size=data.batch_size, num_workers=data.num_workers, collate_fn=collate)
    tokens, grads, counts, masks = [], {layer: [] for layer in extractors}, [], []
    info = dataset.info
    for batch in tqdm(loader, desc="tune features", unit="batch"):
        images = batch["image"].to(device)
        if extractors:
            for number, (layer, extractor) in enumerate(extractors.items()):
                part_tokens, phi = extractor.parts(images)
                grads[layer].append(phi.detach().cpu().half())
                if number == 0:
                    tokens.append(part_tokens.detach().cpu().half())
        else:
            with torch.no_grad():
                tokens.append(encoder(images).cpu().half())
        counts.append(patchify_labels(batch["mask"], encoder.patch_size, info.num_classes, void_to_background))
        masks.append(batch["mask"].to(torch.int16))
    return Parts(torch.cat(tokens), {layer: torch.cat(parts) for layer, parts in grads.items()}, torch.cat(counts),
                 torch.cat(masks))


def fold_ids(num_images: int, folds: int, seed: int) -> list[np.ndarray]:
    """Seeded folds of image ids (each sorted); `folds` above the image count: one image per fold."""
    order = np.random.default_rng(seed).permutation(num_images)
    return [np.sort(part) for part in np.array_split(order, min(folds, num_images))]


def bank_rows(counts: Tensor, images: np.ndarray, per_image: int, rule: str, seed: int) -> np.ndarray:
    """Flat (image x patch) ids of the bank rows of `images`: `per_image` patches of each, drawn as the builder
    draws image i's patches (memory.sampling `rule`, run seed, epoch 0, the image's own index)."""
    patches = counts.shape[1]
    if per_image >= patches:
        return (images[:, None] * patches + np.arange(patches)).reshape(-1)
    return np.concatenate([bank_patches(counts[i], per_image, rule, seed, 0, int(i)).numpy() + i * patches
                           for i in images])


@dataclass
class Tuning:
    """The held-out scores of a grid and its choice."""

    grid: list[dict[str, Any]]  # every candidate x (k, temperature): held-out mIoU
    table: list[dict[str, Any]]  # each candidate at its best setting, against the baseline (bootstrap interval)
    best: dict[str, Any]  # the chosen grid point (a row of `table`)
    baseline: dict[str, Any]  # the run's own candidate and setting (a row of `grid`)
    folds: int
    images: int
    rows_per_image: int

    def sections(self, features: FeatureOptions, retrieval: RetrievalOptions, transfer: TransferOptions
                 ) -> tuple[FeatureOptions, RetrievalOptions, TransferOptions]:
        """The option sections with the chosen feature, transform, k and temperature."""
        chosen = self.best["candidate"]
        return (chosen.features(features), dataclasses.replace(retrieval, k=self.best["k"]),
                dataclasses.replace(transfer, temperature=self.best["temperature"]))

    def apply(self, config: HbirdConfig) -> HbirdConfig:
        """`config` with the chosen settings (a validated copy)."""
        features, retrieval, transfer = self.sections(config.features, config.retrieval, config.transfer)
        return type(config).from_mapping({**config.to_dict(), "features": features.to_dict(),
                                          "retrieval": retrieval.to_dict(), "transfer": transfer.to_dict()})

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the table, the choice, the baseline and the grid (candidates by name)."""
        def plain(row: dict[str, Any]) -> dict[str, Any]:
            return {**row, "candidate": row["candidate"].name}

        return {"folds": self.folds, "images": self.images, "rows_per_image": self.rows_per_image,
                "best": plain(self.best), "baseline": plain(self.baseline),
                "table": [plain(row) for row in self.table], "grid": [plain(row) for row in self.grid]}


def tune_dataset(dataset: SegmentationDataset, encoder: Encoder, *, input_size: tuple[int, int],
                 features: FeatureOptions, memory: MemoryOptions, retrieval: RetrievalOptions,
                 transfer: TransferOptions, data: DataOptions, options: TuneOptions, device: torch.device,
                 seed: int = 0) -> Tuning:
    """Score `options`' grid on held-out folds of the memory images `dataset` and choose the best point.

    `features`, `memory`, `retrieval` and `transfer` are the run's own: they give the FUNGI options, the bank's
    sampling and density, the transform's options and the baseline the table compares with.
    """
    if len(dataset) < 2:
        raise DataError(f"tuning holds memory images out: need at least 2, got {len(dataset)}")
    grid_candidates = list(dict.fromkeys([*candidates(options), baseline(features)]))
    if features.fungi.negatives != "none" and any(c.kind == "fungi" for c in grid_candidates):
        raise ConfigError("tune extracts FUNGI without a support set: features.fungi.negatives must be 'none'")
    settings = list(dict.fromkeys([(k, t) for k in options.k for t in options.temperatures]
                                  + [(retrieval.k, transfer.temperature)]))
    layers = list(dict.fromkeys(c.layer for c in grid_candidates if c.kind == "fungi"))
    extractors = {layer: FungiPatchFeatures(encoder, dataclasses.replace(features.fungi, layer=layer))
                  for layer in layers}
    info = dataset.info
    parts = extract_parts(dataset, encoder, extractors, input_size, data,
                          memory.void_to_background(info.void_to_background), device)
    num_images, patches = parts.counts.shape[:2]
    folds = fold_ids(num_images, num_images if num_images <= LEAVE_ONE_OUT else options.folds, seed)
    per_image = patches_per_image(memory.size, num_images, 1, patches)
    largest = max(num_images - len(fold) for fold in folds)
    if options.rows is not None:
        per_image = min(per_image, patches_per_image(options.rows, largest, 1, patches))
    grid_hw = encoder.grid_size(*input_size)
    scores: dict[tuple[Candidate, Setting], np.ndarray] = {}
    for candidate in tqdm(grid_candidates, desc="tune candidates", unit="feature"):
        rows = parts.rows(candidate, features.fungi.grad_weight)  # (n, N, D)
        matrices = {setting: [None] * num_images for setting in settings}
        for fold in folds:
            held_in = np.setdiff1d(np.arange(num_images), fold)
            ids = bank_rows(parts.counts, held_in, per_image, memory.sampling, seed)
            bank = rows.reshape(-1, rows.shape[-1])[ids]
            queries = rows[fold].reshape(-1, rows.shape[-1])
            if candidate.transform == "whiten" and not too_few_rows(*bank.shape, features.transform):
                transform = FeatureTransform.fit_sample(bank, candidate.features(features).transform, seed)
                bank, queries = transform(bank), transform(queries)
            labels = soft_labels(parts.counts.reshape(-1, info.num_classes)[ids])
            fold_targets = list(parts.masks[fold].long())
            predictions = predict_rows(bank, labels, queries, grid_hw, [tuple(t.shape) for t in fold_targets],
                                       settings, fold_targets, info.ignore_index)
            for image, prediction in zip(fold, predictions):
                for setting, matrix in prediction.confusions.items():
                    matrices[setting][image] = matrix.numpy()
        for setting, stack in matrices.items():
            scores[(candidate, setting)] = np.stack(stack)
    return _choose(scores, grid_candidates, settings, baseline(features), (retrieval.k, transfer.temperature),
                   options, seed, len(folds), num_images, per_image)


def _choose(scores: dict[tuple[Candidate, Setting], np.ndarray], grid_candidates: Sequence[Candidate],
            settings: Sequence[Setting], base: Candidate, base_setting: Setting, options: TuneOptions, seed: int,
            folds: int, images: int, per_image: int) -> Tuning:
    """The grid's held-out mIoUs, each candidate's best point against the baseline, and the overall best."""
    grid = [{"candidate": c, "k": k, "temperature": t, "miou": dataset_miou(scores[(c, (k, t))].sum(0))}
            for c in grid_candidates for k, t in settings]
    base_row = next(r for r in grid if r["candidate"] == base and (r["k"], r["temperature"]) == base_setting)
    draws = resample_indices(images, options.resamples, seed)
    reference = scores[(base, base_setting)]
    table = []
    for candidate in grid_candidates:
        row = max((r for r in grid if r["candidate"] == candidate), key=lambda r: r["miou"])
        result = compare(reference, scores[(candidate, (row["k"], row["temperature"]))], draws)
        table.append({**row, **{key: result[key] for key in ("difference", "low", "high", "excludes_zero")}})
    best = max(table, key=lambda r: r["miou"])
    log.info("tuned on %d held-out images in %d folds: %s k=%d T=%g, held-out mIoU %.2f (the run's own %s k=%d "
             "T=%g: %.2f)", images, folds, best["candidate"].name, best["k"], best["temperature"],
             100 * best["miou"], base.name, base_setting[0], base_setting[1], 100 * base_row["miou"])
    return Tuning(grid, table, best, base_row, folds, images, per_image)


@dataclass
class ExampleTuner:
    """Tunes `InContextSegmenter.from_examples` on its examples (leave one image out up to LEAVE_ONE_OUT images):
    pass `tune=ExampleTuner()`; `tuning` holds the result once the segmenter is built."""

    options: TuneOptions = dataclasses.field(default_factory=TuneOptions)
    tuning: Tuning | None = None

    def __call__(self, examples: SegmentationDataset, encoder: Encoder, *, input_size: tuple[int, int],
                 features: FeatureOptions, memory: MemoryOptions, retrieval: RetrievalOptions,
                 transfer: TransferOptions, data: DataOptions, device: torch.device, seed: int
                 ) -> tuple[tuple[FeatureOptions, RetrievalOptions, TransferOptions], dict[str, Any]]:
        """The tuned feature, retrieval and transfer sections for `examples`, and the tuning's summary."""
        self.tuning = tune_dataset(examples, encoder, input_size=input_size, features=features, memory=memory,
                                   retrieval=retrieval, transfer=transfer, data=data, options=self.options,
                                   device=device, seed=seed)
        log.info("tuned on the examples:\n%s", format_table(self.tuning))
        return self.tuning.sections(features, retrieval, transfer), self.tuning.summary()


def tune(config: HbirdConfig, options: TuneOptions | None = None) -> Tuning:
    """Tune `config` on folds of its memory split (`data.train_split`; the evaluation split is never read)."""
    train, encoder, device = prepare_run(config, None, {})
    return tune_dataset(train, encoder, input_size=encoder.input_size(config.model.input_size),
                        features=config.features, memory=config.memory, retrieval=config.retrieval,
                        transfer=config.transfer, data=config.data, options=options or TuneOptions(), device=device,
                        seed=config.seed)


def write_preset(path: str | Path, config: HbirdConfig, tuning: Tuning, source: str | Path | None) -> None:
    """Write `config` (the tuned one; no memory.path, a bank of other features could not be reused) as a preset,
    headed by comments: where it came from and the table of candidates."""
    body = config.to_dict()
    body["memory"]["path"] = None
    best = tuning.best
    header = [f"Tuned by `hbfungi tune` from {source or 'the defaults'} on held-out memory images: "
              f"{best['candidate'].name}, k={best['k']}, T={best['temperature']:g}.", "", *format_table(tuning).splitlines()]
    text = "".join(f"# {line}".rstrip() + "\n" for line in header)
    write_atomic(path, (text + yaml.safe_dump(body, sort_keys=False)).encode())


def format_table(tuning: Tuning) -> str:
    """The candidates at their best settings against the baseline, the chosen one marked."""
    base = tuning.baseline
    lines = [f"held-out mIoU on {tuning.images} memory images in {tuning.folds} folds "
             f"({tuning.rows_per_image} bank rows per image); baseline {base['candidate'].name} k={base['k']} "
             f"T={base['temperature']:g}: {100 * base['miou']:.2f}",
             f"  {'candidate':<32} {'k':>3} {'T':>5} {'mIoU':>6} {'diff':>6}  95% interval"]
    for row in tuning.table:
        mark = " <- chosen" if row is tuning.best else ""
        lines.append(f"  {row['candidate'].name:<32} {row['k']:>3} {row['temperature']:>5g} {100 * row['miou']:6.2f}"
                     f" {100 * row['difference']:+6.2f}  [{100 * row['low']:+.2f}, {100 * row['high']:+.2f}]{mark}")
    return "\n".join(lines)

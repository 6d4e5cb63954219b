"""`hbfungi knn`: extract (or reuse cached) image-level features and evaluate every block combination.

The train and eval splits are loaded, every configured block (the embedding and the KL/DINO/SimCLR
gradient features) is extracted through the feature cache, and every combination of blocks is
evaluated: each block L2-normalised, blocks concatenated, optional PCA fitted on the train rows,
kNN with a uniform (reference) or similarity-weighted vote, on the full train set and on few-shot
subsets (math in `eval.knn`).
"""

from __future__ import annotations

import itertools
import logging
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from hummingbird_fungi import __version__
from hummingbird_fungi.config.schema import KnnConfig, KnnOptions
from hummingbird_fungi.data.classification import ClassificationData, load_classification
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.eval.knn import classification_metrics, few_shot_indices, knn_search, knn_vote, reduce
from hummingbird_fungi.features.cache import FeatureCache
from hummingbird_fungi.features.fungi_image import (
    BLOCKS,
    FeatureBlock,
    ImageFungi,
    SimCLRObjective,
    build_objective,
    combination_name,
)
from hummingbird_fungi.runtime import resolve_device

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- evaluation


def concat_blocks(blocks: dict[str, np.ndarray], names: tuple[str, ...], device: torch.device) -> torch.Tensor:
    """Concatenate unit-norm blocks [emb, kl, dino, simclr] in canonical order -> (N, sum D) on device."""
    ordered = [b for b in BLOCKS if b in names]
    return torch.from_numpy(np.concatenate([blocks[b] for b in ordered], axis=1)).to(device)


def evaluate(train: torch.Tensor, train_labels: np.ndarray, test: torch.Tensor, test_labels: np.ndarray,
             num_classes: int, knn: KnnOptions) -> dict[str, dict[str, Any]]:
    """PCA (reference rule) and one neighbour search, then every vote -> {vote: metrics, PCA size, dim}."""
    train, test, pca = reduce(train, test, knn.pca)
    distances, ids = knn_search(train, test, min(knn.k, train.shape[0]))
    neighbour_labels = torch.from_numpy(train_labels).to(train.device)[ids]  # (Q, k)
    out = {}
    for vote in knn.vote:
        predictions = knn_vote(neighbour_labels, distances, num_classes, vote, knn.temperature)
        out[vote] = {**classification_metrics(predictions.cpu().numpy(), test_labels), "pca": pca,
                     "dim": int(train.shape[1])}
    return out


def train_settings(knn: KnnOptions) -> list[tuple[Any, str | None, list[int]]]:
    """(shots, few-shot rule, seeds) of every train set to evaluate: full, then each shots x rule."""
    settings: list[tuple[Any, str | None, list[int]]] = []
    for shots in knn.shots:
        if shots == "full":
            settings.append(("full", None, [0]))
        else:
            settings.extend((shots, rule, knn.few_shot_seeds if rule == "random" else [0])
                            for rule in knn.few_shot_rule)
    return settings


def evaluate_combination(names: tuple[str, ...], train_blocks: dict[str, np.ndarray], train_labels: np.ndarray,
                         test_blocks: dict[str, np.ndarray], test_labels: np.ndarray, num_classes: int,
                         knn: KnnOptions, device: torch.device) -> list[dict[str, Any]]:
    """Result rows of one block combination: every train setting (full, few-shot rules) x vote."""
    train = concat_blocks(train_blocks, names, device)
    test = concat_blocks(test_blocks, names, device)
    rows = []
    for shots, rule, seeds in train_settings(knn):
        runs = []
        for seed in seeds:
            if shots == "full":  # the whole train matrix as it is, no indexed copy
                subset, labels = train, train_labels
            else:
                ids = few_shot_indices(train_labels, shots, rule, seed)
                subset, labels = train[torch.from_numpy(ids).to(device)], train_labels[ids]
            runs.append(evaluate(subset, labels, test, test_labels, num_classes, knn))
        for vote in knn.vote:
            rows.append({"features": combination_name(names), "vote": vote, "k": knn.k, "shots": shots,
                         "few_shot_rule": rule, **_mean_runs([run[vote] for run in runs], seeds, rule)})
    return rows


def _mean_runs(runs: list[dict[str, Any]], seeds: list[int], rule: str) -> dict[str, Any]:
    """One row from few-shot runs: metric means (and std and per-seed values for random draws)."""
    row = {key: runs[0][key] for key in ("pca", "dim")}
    for metric in ("accuracy", "mean_per_class_accuracy"):
        values = np.array([run[metric] for run in runs])
        row[metric] = float(values.mean())
        if rule == "random":
            row[f"{metric}_std"] = float(values.std())
    if rule == "random":
        row["seeds"] = list(seeds)
        row["per_seed_accuracy"] = [run["accuracy"] for run in runs]
    return row


def combinations(available: list[str], wanted: Any) -> list[tuple[str, ...]]:
    """Every non-empty subset of the available blocks ('all'), or the named ones ('emb+kl', ...)."""
    ordered = [b for b in BLOCKS if b in available]
    if wanted == "all":
        return [c for r in range(1, len(ordered) + 1) for c in itertools.combinations(ordered, r)]
    out = []
    for name in wanted:
        parts = tuple(name.split("+"))
        unknown = [p for p in parts if p not in ordered]
        if unknown:
            raise ConfigError(f"knn.combinations: {name!r} uses blocks {unknown} that are not extracted ({ordered})")
        out.append(parts)
    return out


# --------------------------------------------------------------------------- extraction


class _Views(Dataset):
    """Dataset rows `rows` of a split mapped to their views (V, 3, S, S)."""

    def __init__(self, data: ClassificationData, views: Callable[[Any, int], torch.Tensor], rows: list[int]) -> None:
        self.data, self.views, self.rows = data, views, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> torch.Tensor:
        index = self.rows[position]
        image, _ = self.data[index]
        return self.views(image, index)


def extract_block(block: FeatureBlock, data: ClassificationData, cache: FeatureCache, num_workers: int,
                  desc: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Fill the cache's missing chunks of one block on one split -> features (N, D) and throughput."""
    pending = list(cache.missing())
    rows = [i for _, start, stop in pending for i in range(start, stop)]
    stats: dict[str, Any] = {"images": len(rows), "seconds": 0.0, "images_per_second": None}
    if rows:
        loader = DataLoader(_Views(data, block.views, rows), batch_size=block.batch_size, num_workers=num_workers)
        start_time = time.perf_counter()
        buffer = np.zeros((0, block.dim), dtype=np.float32)
        with tqdm(total=len(rows), desc=desc, unit="img", dynamic_ncols=True) as bar:
            for views in loader:  # (B, V, 3, S, S)
                buffer = np.concatenate([buffer, block.compute(views).float().cpu().numpy()])
                while pending and len(buffer) >= pending[0][2] - pending[0][1]:
                    index, first, last = pending.pop(0)
                    cache.put(index, buffer[:last - first])
                    buffer = buffer[last - first:]
                bar.update(views.shape[0])
        stats["seconds"] = time.perf_counter() - start_time
        stats["images_per_second"] = len(rows) / stats["seconds"]
        log.info("%s: %d images in %.1f s (%.2f images/s)", desc, len(rows), stats["seconds"],
                 stats["images_per_second"])
    return cache.load(), stats


def encode_negatives(extractor: ImageFungi, objective: SimCLRObjective, train: ClassificationData,
                     batch_size: int) -> float:
    """Embed the views of the SimCLR negative images (no grad) and give them to the objective -> seconds."""
    start = time.perf_counter()
    ids = objective.negative_ids
    embeddings = []
    for first in tqdm(range(0, len(ids), batch_size), desc="simclr negatives", unit="batch", dynamic_ncols=True):
        views = torch.cat([objective.views(train[i][0], i) for i in ids[first:first + batch_size]])  # (b V, 3, S, S)
        embeddings.append(extractor.encode(views))
    objective.set_negatives(torch.cat(embeddings), ids)  # (M V, E)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- run


def load_split(config: KnnConfig, which: str) -> ClassificationData:
    """The train or eval split of `data`, with its seeded subset (data.subset / data.eval_subset) when set."""
    from hummingbird_fungi.data.subsets import random_subset, subset_seed

    data = config.data
    split = load_classification(data.kind, data.root, getattr(data, f"{which}_split"))
    size = data.subset if which == "train" else data.eval_subset
    if size is not None:
        split = split.subset(random_subset(split.ids, size, subset_seed(data.subset_seed, config.seed)))
    return split


def build_extractor(config: KnnConfig, device: torch.device, num_train: int) -> ImageFungi:
    """Encoder, shared projection and the configured objectives."""
    from hummingbird_fungi.models.factory import create_encoder

    model, features = config.model, config.features
    size = model.input_size[0]
    encoder = create_encoder(model.name, weights=model.weights, pretrained=model.pretrained, device=device)
    options = ({"rank": features.rank, "distribution": features.projection_distribution}
               if features.projection == "structured" else {})
    extractor = ImageFungi(encoder, size, config.seed, features.projection, options, layer=features.layer,
                           autocast=features.autocast, embed_batch_size=config.data.batch_size)
    for name in features.objectives:
        objective = build_objective(name, encoder.embed_dim, size, config.seed, getattr(features, name))
        if isinstance(objective, SimCLRObjective):
            objective.negative_ids = objective.negative_images(num_train)
        extractor.add_objective(objective)
    return extractor


def extract_all(extractor: ImageFungi, names: list[str], splits: dict[str, ClassificationData],
                config: KnnConfig) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, Any]]]:
    """Every block on every split, through the feature cache -> features[split][block], throughput[block]."""
    features = config.features
    blocks: dict[str, dict[str, np.ndarray]] = {which: {} for which in splits}
    throughput: dict[str, dict[str, Any]] = {}
    for name in names:
        block = extractor.block(name)
        objective = extractor.objectives.get(name)
        stats: dict[str, Any] = {"views_per_image": objective.num_views if objective else 1}
        for which, data in splits.items():
            parts = (extractor.encoder.name, _dataset_slug(data), data.split, name)
            cache = FeatureCache(features.cache_dir, parts, {"block": block.options, "data": data.identity()},
                                 len(data), block.dim, features.chunk_size)
            if isinstance(objective, SimCLRObjective) and objective.negatives is None and cache.missing_rows():
                stats["negatives_seconds"] = encode_negatives(extractor, objective, splits["train"], block.batch_size)
            blocks[which][name], stats[which] = extract_block(block, data, cache, config.data.num_workers,
                                                              f"{name} {which}")
        throughput[name] = _throughput(stats)
    return blocks, throughput


def run_knn(config: KnnConfig) -> dict:
    """Extract (or reuse cached) features for train and eval, evaluate every block combination -> results."""
    knn, features = config.knn, config.features
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    train, test = load_split(config, "train"), load_split(config, "eval")
    if train.classes != test.classes:
        raise ConfigError(f"train and eval splits have different classes: {train.classes} vs {test.classes}")
    counts = np.bincount(train.targets, minlength=len(train.classes))
    for shots in (s for s in knn.shots if s != "full" and counts.min() < s):
        log.warning("%d-shot: classes %s have fewer train images; all of theirs are used", shots,
                    [train.classes[c] for c in np.flatnonzero(counts < shots)])
    names = (["emb"] if features.embedding else []) + list(features.objectives)
    if not names:
        raise ConfigError("nothing to extract: set features.embedding=true or list features.objectives")
    combos = combinations(names, knn.combinations)
    extractor = build_extractor(config, device, len(train))
    blocks, throughput = extract_all(extractor, names, {"train": train, "eval": test}, config)
    rows = []
    for combo in tqdm(combos, desc="kNN", unit="combination", dynamic_ncols=True):
        rows.extend(evaluate_combination(combo, blocks["train"], train.targets, blocks["eval"], test.targets,
                                         len(train.classes), knn, device))
    return {
        "version": __version__,
        "config": config.to_dict(),
        "data": {"train": train.identity(), "eval": test.identity(), "classes": train.classes},
        "blocks": {name: extractor.block(name).options for name in names},
        "throughput": throughput,
        "environment": {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "machine": platform.machine(), "processor": platform.processor()},
        "results": rows,
    }


def _dataset_slug(data: ClassificationData) -> str:
    """Cache folder name of a dataset: its kind, plus the root's folder name for folder datasets."""
    return data.name if data.root is None else f"{data.name}-{Path(data.root).name}"


def _throughput(stats: dict[str, Any]) -> dict[str, Any]:
    """Images per second over both splits (None when everything came from the cache)."""
    images = stats["train"]["images"] + stats["eval"]["images"]
    seconds = stats["train"]["seconds"] + stats["eval"]["seconds"]
    return {**stats, "images": images, "seconds": seconds, "images_per_second": images / seconds if images else None}


LEGEND = ("each cell: top-1 accuracy / mean per-class accuracy (%); columns: train rows used (full set or "
          "N shots per class, first or random) and the vote (uniform or weighted)")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A text table: one line per feature combination, 'top-1 / mean per-class' (%) per setting."""
    def setting(row: dict[str, Any]) -> str:
        shots = "full" if row["shots"] == "full" else f"{row['shots']}-shot {row['few_shot_rule']}"
        return f"{shots} ({row['vote']})"

    settings = list(dict.fromkeys(setting(r) for r in rows))
    features = list(dict.fromkeys(r["features"] for r in rows))
    cells = {(r["features"], setting(r)): f"{100 * r['accuracy']:.2f} / {100 * r['mean_per_class_accuracy']:.2f}"
             for r in rows}
    width = max(len(f) for f in features + ["features"])
    columns = [max(len(s), 15) for s in settings]
    lines = [LEGEND, " | ".join(["features".ljust(width)] + [s.ljust(w) for s, w in zip(settings, columns)])]
    lines.append("-+-".join(["-" * width] + ["-" * w for w in columns]))
    for feature in features:
        lines.append(" | ".join([feature.ljust(width)] + [cells.get((feature, s), "-").ljust(w)
                                                          for s, w in zip(settings, columns)]))
    return "\n".join(lines)

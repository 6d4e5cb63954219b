"""Fill a memory bank from a dataset and a patch feature extractor: sampled, sharded, resumable.

Every random choice of an image depends only on (seed, epoch, image index), so a resumed or
distributed build equals an uninterrupted one. The manifest records the whole recipe (features,
label space, the file list, sampling, seed, epochs, ...) so that a saved bank is only reused for
the configuration that built it, and each shard records the sizes and modification times of its
images and masks, so a resumed build rebuilds the shards whose files changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from hummingbird_fungi.config.schema import DataOptions, FeatureOptions, MemoryOptions, TransformOptions
from hummingbird_fungi.data.transforms import TrainTransform
from hummingbird_fungi.distributed import barrier, rank_and_world
from hummingbird_fungi.errors import ConfigError, DataError, worker_errors_unwrapped
from hummingbird_fungi.features import EmbeddingFeatures, PatchFeatures, build_patch_features
from hummingbird_fungi.features.base import finite_rows
from hummingbird_fungi.features.transform import (ARRAY_NAMES, FeatureTransform, TransformedFeatures,
                                                  recipe_identity, transform_identity, transform_key)
from hummingbird_fungi.fileio import TEMP_MARK, make_dirs, save_npy_atomic, write_atomic
from hummingbird_fungi.memory.bank import (FORMAT_VERSION, BankWriter, MemoryBank, manifest_differences, manifest_json,
                                           npy_shape, shard_name)
from hummingbird_fungi.memory.labels import bank_patches, patches_per_image, patchify_labels, soft_labels
from hummingbird_fungi.models.encoders import Encoder
from hummingbird_fungi.runtime import timed

log = logging.getLogger(__name__)


def bank_recipe(memory: MemoryOptions, seed: int, void_to_background: bool) -> dict[str, Any]:
    """The manifest's `spec`: what of `memory` defines a bank's rows (not its location), the run seed and the
    void rule resolved for the dataset."""
    recipe = {key: value for key, value in memory.to_dict().items() if key != "path"}
    return {**recipe, "void_to_background": void_to_background, "seed": seed}


def _shard_plan(num_images: int, memory: MemoryOptions) -> list[tuple[int, int, int]]:
    """(epoch, first image, end image) of every shard, epoch-major."""
    plan = []
    for epoch in range(memory.augmentation_epochs):
        for start in range(0, num_images, memory.shard_images):
            plan.append((epoch, start, min(start + memory.shard_images, num_images)))
    return plan


def _digest(entries: list) -> str:
    """SHA-256 of a JSON list."""
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def file_list_digest(dataset) -> str | None:
    """Digest of the names of the image and mask files of `dataset`, in order (None without a sample list)."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return None
    return _digest([[getattr(file, "name", str(file)) for file in sample] for sample in samples])


def shard_sources(dataset, start: int, end: int) -> str | None:
    """Digest of (file, size, modification time) of the images and masks of samples [start, end)."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return None
    entries = []
    for sample in samples[start:end]:
        for file in sample:
            try:
                stat = os.stat(file) if isinstance(file, (str, os.PathLike)) else None
            except OSError:
                stat = None
            entries.append([str(file), stat and stat.st_size, stat and stat.st_mtime_ns])
    return _digest(entries)


def bank_manifest(dataset, extractor: PatchFeatures, memory: MemoryOptions, seed: int,
                  manifest_extra: dict | None = None) -> dict:
    """What a bank of `dataset`, `extractor`, `memory` and `seed` records: the recipe a saved bank must match to be
    reused."""
    if len(dataset) == 0:
        raise DataError("cannot build a memory bank from an empty dataset")
    height, width = dataset[0]["image"].shape[-2:]
    grid = extractor.encoder.grid_size(height, width)
    return {
        "format_version": FORMAT_VERSION,
        "features": extractor.manifest(),
        "input_size": [int(height), int(width)],
        "grid": list(grid),
        "num_classes": dataset.info.num_classes,
        "class_names": list(dataset.info.class_names),
        "ignore_index": dataset.info.ignore_index,
        "dataset": dataset.info.name,
        "num_images": len(dataset),
        "files": file_list_digest(dataset),
        "patches_per_image": patches_per_image(memory.size, len(dataset), memory.augmentation_epochs,
                                               grid[0] * grid[1]),
        "spec": bank_recipe(memory, seed, memory.void_to_background(dataset.info.void_to_background)),
        **(manifest_extra or {}),
    }


def _extract_shard(dataset, extractor: PatchFeatures, spec: dict[str, Any], epoch: int, start: int, end: int,
                   n_img: int, batch_size: int, num_workers: int, device: torch.device,
                   progress: tqdm, non_finite: str = "error") -> tuple[np.ndarray, np.ndarray]:
    """Features (rows, D) and soft labels (rows, C) of the sampled patches of images [start, end) at `epoch`
    (`spec`: the recipe); rows with NaN or inf are refused, or left out with `non_finite` 'drop'."""
    from hummingbird_fungi.data.segmentation import collate

    dataset.set_epoch(epoch)
    subset = torch.utils.data.Subset(dataset, range(start, end))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate)
    patch = extractor.encoder.patch_size
    info = dataset.info
    feats, labels = [], []
    for batch in loader:
        counts = patchify_labels(batch["mask"], patch, info.num_classes, spec["void_to_background"])  # (B, N, C)
        num_patches = counts.shape[1]
        if n_img < num_patches:
            select = torch.stack([bank_patches(counts[i], n_img, spec["sampling"], spec["seed"], epoch, int(idx))
                                  for i, idx in enumerate(batch["index"])])  # (B, n)
            counts = torch.gather(counts, 1, select.unsqueeze(-1).expand(-1, -1, counts.shape[-1]))
        else:
            select = None
        features = extractor(batch["image"].to(device), select, image_ids=batch["index"])  # (B, n, D)
        names = [f"{path} (image {int(index)})" for path, index in zip(batch["path"], batch["index"])]
        keep = finite_rows(features, names, "memory-bank feature", non_finite).cpu()  # (B, n)
        feats.append(features.cpu()[keep].numpy().astype(spec["dtype"]))  # (rows, D)
        labels.append(soft_labels(counts)[keep].numpy().astype(spec["label_dtype"]))  # (rows, C)
        progress.update(len(batch["index"]))
    return np.concatenate(feats), np.concatenate(labels)


def build_memory_bank(dataset, extractor: PatchFeatures, memory: MemoryOptions, seed: int = 0,
                      manifest_extra: dict | None = None, batch_size: int = 4, num_workers: int = 0,
                      device: str | torch.device = "cpu", resume: bool = True,
                      distributed: bool = True, non_finite: str = "error") -> MemoryBank:
    """Fill a memory bank from `dataset` (a SegmentationDataset with a train transform) as `memory` says.

    With `memory.path`, shards are written to `<path>.partial/` as they finish and the
    directory becomes `<path>` when complete; an existing partial build with the same
    manifest is resumed. Without `path` the bank stays in RAM. Under torch.distributed
    (and `distributed`) each rank extracts every world-th shard and rank 0 seals the bank.
    Feature rows with NaN or inf are refused, or left out with `non_finite` 'drop' (`features.non_finite`).
    """
    device = torch.device(device)
    manifest = bank_manifest(dataset, extractor, memory, seed, manifest_extra)
    n_img, spec, path = manifest["patches_per_image"], manifest["spec"], memory.path
    plan = _shard_plan(len(dataset), memory)
    rank, world = rank_and_world() if distributed else (0, 1)
    if world > 1 and path is None:
        raise ConfigError("a distributed build needs memory.path: ranks exchange shards through it")
    writer = None if path is None else BankWriter(path, manifest, resume, create=rank == 0)
    try:
        barrier()
        feats, labels, labelled, rows, kept = [], [], 0, 0, 0
        mine = [n for n in range(len(plan)) if n % world == rank]
        with tqdm(total=sum(plan[n][2] - plan[n][1] for n in mine), desc="memory bank", unit="img",
                  disable=rank != 0) as progress, worker_errors_unwrapped():
            for number in mine:
                epoch, start, end = plan[number]
                sources = None if writer is None else shard_sources(dataset, start, end)
                if writer is not None and writer.has_shard(number, sources):
                    progress.update(end - start)
                    kept += 1
                    continue
                shard_feats, shard_labels = _extract_shard(dataset, extractor, spec, epoch, start, end, n_img,
                                                           batch_size, num_workers, device, progress, non_finite)
                labelled += int((shard_labels.astype(np.float32).sum(1) > 0).sum())
                rows += len(shard_labels)
                if writer is None:
                    feats.append(shard_feats)
                    labels.append(shard_labels)
                else:
                    writer.write_shard(number, shard_feats, shard_labels, sources)
        if world == 1 and not kept and not rows:
            raise DataError(f"every feature row of the {len(dataset)} memory images of {dataset.info.name} held NaN "
                            f"or inf and was dropped (features.non_finite=drop): the bank would be empty")
        if world == 1 and not kept and not labelled:
            raise DataError(f"every sampled patch of the {len(dataset)} memory images of {dataset.info.name} is void "
                            f"(ignore id {dataset.info.ignore_index}): the bank would hold no labels")
        shards = [{"name": shard_name(n), "epoch": epoch, "images": [start, end]}
                  for n, (epoch, start, end) in enumerate(plan)]
        if writer is None:
            for shard, block in zip(shards, feats):
                shard["rows"] = len(block)
            return MemoryBank(feats, labels, {**manifest, "shards": shards, "count": int(sum(len(f) for f in feats))})
        barrier()
        if rank == 0:
            writer.seal(shards)
        barrier()
    finally:
        if writer is not None:
            writer.close()
    return MemoryBank.load(path)


def subsample_bank(bank: MemoryBank, n_img: int, rule: str = "label_aware") -> MemoryBank:
    """Keep `n_img` rows per image of an unbounded bank by the builder's own sampling draws.

    Without augmentation this equals building the bounded bank directly (same seeds, same
    label statistics), so several memory sizes can share one feature extraction. The full bank's
    feature transform, if any, is kept.
    """
    manifest = bank.manifest
    per_image, spec = manifest["patches_per_image"], manifest["spec"]
    if spec["size"] is not None:
        raise ConfigError("subsample_bank needs an unbounded bank (memory.size=null)")
    features = np.concatenate(bank.feature_blocks).reshape(-1, per_image, bank.stored_dim)
    labels = np.concatenate(bank.label_blocks).reshape(-1, per_image, bank.num_classes)
    keep = []
    for item in range(len(features)):
        epoch, index = divmod(item, manifest["num_images"])
        keep.append(bank_patches(torch.from_numpy(labels[item].astype(np.float32)), n_img, rule, spec["seed"], epoch,
                                 index).numpy())
    rows = np.stack(keep)[..., None]  # (items, n_img, 1)
    new_spec = {**spec, "size": n_img * len(features), "sampling": rule}  # rows = n_img x images x epochs
    shards = [{**shard, "rows": (shard["images"][1] - shard["images"][0]) * n_img} for shard in manifest["shards"]]
    splits = np.cumsum([shard["rows"] for shard in shards])[:-1]  # one block per shard, as built
    return MemoryBank(
        np.split(np.take_along_axis(features, rows, 1).reshape(-1, bank.stored_dim), splits),
        np.split(np.take_along_axis(labels, rows, 1).reshape(-1, bank.num_classes), splits),
        {**manifest, "patches_per_image": n_img, "spec": new_spec, "shards": shards, "count": n_img * len(features)},
        transform=bank.transform)


# --------------------------------------------------------------------------- a bank for an encoder and options


def memory_transform(size: tuple[int, int], normalize: str, memory: MemoryOptions) -> TrainTransform:
    """The memory-bank transform: train augmentation when `memory.augment`, else a plain resize."""
    return TrainTransform(size, normalize=normalize, jitter=memory.augment, crop=memory.augment)


def make_extractor(encoder: Encoder, features: FeatureOptions, train_set, memory: MemoryOptions, data: DataOptions,
                   device: torch.device, seed: int, timings: dict[str, float] | None = None) -> PatchFeatures:
    """The patch feature extractor of `features`, with its support set built when it needs one."""
    extractor = build_patch_features(features.kind, encoder, features.fungi)
    if extractor.needs_support:
        with timed(timings, "support_bank_s"):
            support_memory = dataclasses.replace(memory, size=features.support.size, path=None,
                                                 augmentation_epochs=features.support.augmentation_epochs)
            support = build_memory_bank(train_set, EmbeddingFeatures(encoder), support_memory, seed,
                                        batch_size=data.batch_size, device=device, num_workers=data.num_workers,
                                        distributed=False, non_finite=features.non_finite)
            extractor.set_support(torch.from_numpy(np.concatenate(support.feature_blocks)).float(),
                                  image_ids=support.row_images())
    return extractor


# --------------------------------------------------------------------------- the feature transform


TRANSFORM_RECIPE = "transform.json"  # written last into a stored transform's folder


def transform_folder(bank: str | Path, key: str) -> Path:
    """Where the bank at `bank` stores the feature transform `key`: `<bank>/transforms/<key>/`."""
    return Path(bank) / "transforms" / key


def read_transform(folder: Path, recipe: dict[str, Any], where: str) -> FeatureTransform:
    """The transform of `recipe` from the `transform_*.npy` files in `folder` (a truncated file is named)."""
    arrays = {}
    for name in ARRAY_NAMES:
        file = folder / f"{name}.npy"
        if file.is_file():
            npy_shape(file)
            arrays[name] = np.load(file)
    return FeatureTransform.from_arrays(recipe, arrays, where)


def stored_transform(folder: Path, identity: dict[str, Any]) -> FeatureTransform | None:
    """The transform stored in `folder` (None when there is none); DataError when it records another identity."""
    file = folder / TRANSFORM_RECIPE
    if not file.is_file():
        return None
    try:
        recipe = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"corrupt feature transform recipe {file}: {exc}; remove {folder} to refit it") from exc
    diffs = manifest_differences(recipe_identity(recipe) if isinstance(recipe, dict) else recipe,
                                 json.loads(manifest_json(identity)))
    if diffs:
        raise DataError(f"feature transform {folder} records another recipe; remove it to refit:\n  "
                        + "\n  ".join(diffs))
    return read_transform(folder, recipe, str(folder))


def store_transform(folder: Path, transform: FeatureTransform) -> None:
    """Write `transform` to `folder` all at once (files into a fresh hidden folder beside it, then one rename); an
    existing transform is never replaced, and a bank that cannot be written to only costs a refit next time."""
    parent = folder.parent
    try:
        make_dirs(parent)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}{TEMP_MARK}", dir=parent))
    except (OSError, DataError) as exc:
        log.warning("could not store the feature transform in %s (%s); it is refitted by each run", folder, exc)
        return
    try:
        for name, array in transform.arrays().items():
            save_npy_atomic(staging / f"{name}.npy", array)
        write_atomic(staging / TRANSFORM_RECIPE, manifest_json(transform.recipe))  # last: marks it complete
        os.rename(staging, folder)
        log.info("feature transform stored in %s", folder)
    except (OSError, DataError) as exc:
        if (folder / TRANSFORM_RECIPE).is_file():
            log.info("another run stored the feature transform %s first; keeping it", folder)
        else:
            log.warning("could not store the feature transform in %s (%s); it is refitted by each run", folder, exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def feature_transform(bank: MemoryBank, options: TransformOptions, seed: int, path: str | Path | None = None,
                      timings: dict[str, float] | None = None) -> FeatureTransform:
    """The transform of `options` for the raw rows of `bank` (read past any transform it has): the one stored with
    the bank at `path` when there, else fitted on a uniform sample of `options.fit_rows` rows drawn with `seed` (and
    stored there)."""
    identity = transform_identity(options, seed)
    folder = None if path is None else transform_folder(path, transform_key(identity))
    transform = None if folder is None else stored_transform(folder, identity)
    if transform is not None:
        log.info("loaded the feature transform %s (%d -> %d dims)", folder, bank.stored_dim, transform.dim)
        return transform
    with timed(timings, "fit_transform_s"):
        rows = bank.with_transform(None).sample_features(options.fit_rows, seed)
        transform = FeatureTransform.fit(rows, options, seed)
    log.info("fitted a PCA%s on %d memory rows: %d -> %d dims", " with whitening" if options.whiten else "",
             transform.recipe["fitted_rows"], bank.stored_dim, transform.dim)
    if folder is not None:
        store_transform(folder, transform)
    return transform


def transformed(bank: MemoryBank, extractor: PatchFeatures, transform: FeatureTransform
                ) -> tuple[MemoryBank, PatchFeatures]:
    """`bank` read through `transform` and `extractor` followed by it: a bank and its queries in one space."""
    return bank.with_transform(transform), TransformedFeatures(extractor, transform)


# --------------------------------------------------------------------------- the bank of a run


def build_memory(encoder: Encoder, train_set, *, input_size: tuple[int, int], features: FeatureOptions,
                 memory: MemoryOptions, data: DataOptions, device: torch.device, seed: int,
                 timings: dict[str, float] | None = None,
                 manifest_extra: dict | None = None) -> tuple[MemoryBank, PatchFeatures]:
    """The memory bank of `train_set` (loaded from memory.path when it exists, else built, and saved there) and
    the extractor of its queries; with `features.transform.pca` both go through a transform fitted on the raw
    rows (`feature_transform`: stored with a saved bank, one folder per recipe, reused when there).

    A saved bank is reused only if it records this very recipe (features, data and file list, sampling,
    seed, epochs, size, ...); otherwise BankMismatchError names the keys that differ.
    """
    torch.manual_seed(seed)
    train_set = train_set.with_transform(memory_transform(input_size, data.normalize, memory), seed=seed)
    extractor = make_extractor(encoder, features, train_set, memory, data, device, seed, timings)
    path = memory.path
    if path is not None and Path(path).exists():
        recipe = bank_manifest(train_set, extractor, memory, seed, manifest_extra)
        recipe.pop("model", None)  # how to reopen the model; what it computes is in features, input_size, spec
        with timed(timings, "load_memory_s"):
            bank = MemoryBank.load(path, expect_features=extractor.manifest(), expect_build=recipe)
        log.info("loaded memory bank %s (%d rows, built from %s)", path, bank.count, bank.manifest.get("dataset"))
    else:
        with timed(timings, "build_memory_s"):
            bank = build_memory_bank(train_set, extractor, memory, seed, manifest_extra=manifest_extra,
                                     batch_size=data.batch_size, num_workers=data.num_workers, device=device,
                                     non_finite=features.non_finite)
    if not features.transform.pca or too_few_rows(bank.count, bank.stored_dim, features.transform):
        return bank, extractor
    return transformed(bank, extractor, feature_transform(bank, features.transform, seed, path, timings))


def too_few_rows(rows: int, dim: int, options: TransformOptions) -> bool:
    """Whether `rows` memory rows of `dim` features are too few to fit the transform on (`min_rows_per_dim`): the
    transform is then left out, with a warning."""
    if options.min_rows_per_dim is None or rows >= options.min_rows_per_dim * dim:
        return False
    log.warning("features not whitened: %d memory rows of %d features are fewer than features.transform."
                "min_rows_per_dim=%g per feature", rows, dim, options.min_rows_per_dim)
    return True

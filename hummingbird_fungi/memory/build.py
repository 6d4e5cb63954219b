"""Fill a memory bank from a dataset and a patch feature extractor: sampled, sharded, resumable.

Every random choice of an image depends only on (seed, epoch, image index), so a resumed or
distributed build equals an uninterrupted one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from hummingbird_fungi.distributed import barrier, rank_and_world
from hummingbird_fungi.errors import ConfigError, DataError
from hummingbird_fungi.features.base import PatchFeatures
from hummingbird_fungi.memory.bank import FORMAT_VERSION, BankWriter, MemoryBank, shard_name
from hummingbird_fungi.memory.labels import patches_per_image, patchify_labels, sample_patches, soft_labels
from hummingbird_fungi.runtime import generator

log = logging.getLogger(__name__)


@dataclass
class BankSpec:
    """How to fill a bank: sampling, augmentation epochs, storage dtypes and shard size."""

    memory_size: int | None = 102400
    epochs: int = 1
    sampling: str = "label_aware"
    void_to_background: bool = True
    dtype: str = "float16"
    label_dtype: str = "float16"
    shard_images: int = 256
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Fields for the manifest."""
        return dict(self.__dict__)


def _shard_plan(num_images: int, spec: BankSpec) -> list[tuple[int, int, int]]:
    """(epoch, first image, end image) of every shard, epoch-major."""
    plan = []
    for epoch in range(spec.epochs):
        for start in range(0, num_images, spec.shard_images):
            plan.append((epoch, start, min(start + spec.shard_images, num_images)))
    return plan


def _extract_shard(dataset, extractor: PatchFeatures, spec: BankSpec, epoch: int, start: int, end: int,
                   n_img: int, batch_size: int, num_workers: int, device: torch.device,
                   progress: tqdm) -> tuple[np.ndarray, np.ndarray]:
    """Features and soft labels of the sampled patches of images [start, end) at `epoch`."""
    from hummingbird_fungi.data.segmentation import collate

    dataset.set_epoch(epoch)
    subset = torch.utils.data.Subset(dataset, range(start, end))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate)
    patch = extractor.encoder.patch_size
    info = dataset.info
    feats, labels = [], []
    for batch in loader:
        counts = patchify_labels(batch["mask"], patch, info.num_classes, spec.void_to_background)  # (B, N, C)
        num_patches = counts.shape[1]
        if n_img < num_patches:
            select = torch.stack([
                sample_patches(counts[i], n_img, spec.sampling,
                               generator(spec.seed + 1, epoch, int(idx)))
                for i, idx in enumerate(batch["index"])])  # (B, n)
            counts = torch.gather(counts, 1, select.unsqueeze(-1).expand(-1, -1, counts.shape[-1]))
        else:
            select = None
        features = extractor(batch["image"].to(device), select, image_ids=batch["index"])  # (B, n, D)
        feats.append(features.reshape(-1, features.shape[-1]).cpu().numpy().astype(spec.dtype))
        labels.append(soft_labels(counts).reshape(-1, counts.shape[-1]).numpy().astype(spec.label_dtype))
        progress.update(len(batch["index"]))
    return np.concatenate(feats), np.concatenate(labels)


def build_memory_bank(dataset, extractor: PatchFeatures, spec: BankSpec, path: str | Path | None = None,
                      manifest_extra: dict | None = None, batch_size: int = 4, num_workers: int = 0,
                      device: str | torch.device = "cpu", resume: bool = True,
                      distributed: bool = True) -> MemoryBank:
    """Fill a memory bank from `dataset` (a SegmentationDataset with a train transform).

    With `path`, shards are written to `<path>.partial/` as they finish and the
    directory becomes `<path>` when complete; an existing partial build with the same
    manifest is resumed. Without `path` the bank stays in RAM. Under torch.distributed
    (and `distributed`) each rank extracts every world-th shard and rank 0 seals the bank.
    """
    device = torch.device(device)
    if len(dataset) == 0:
        raise DataError("cannot build a memory bank from an empty dataset")
    height, width = dataset[0]["image"].shape[-2:]
    grid = extractor.encoder.grid_size(height, width)
    num_patches = grid[0] * grid[1]
    n_img = patches_per_image(spec.memory_size, len(dataset), spec.epochs, num_patches)
    plan = _shard_plan(len(dataset), spec)
    manifest = {
        "format_version": FORMAT_VERSION,
        "features": extractor.manifest(),
        "input_size": [int(height), int(width)],
        "grid": list(grid),
        "num_classes": dataset.info.num_classes,
        "class_names": list(dataset.info.class_names),
        "ignore_index": dataset.info.ignore_index,
        "dataset": dataset.info.name,
        "num_images": len(dataset),
        "patches_per_image": n_img,
        "spec": spec.as_dict(),
        **(manifest_extra or {}),
    }
    rank, world = rank_and_world() if distributed else (0, 1)
    if world > 1 and path is None:
        raise ConfigError("a distributed build needs memory.path: ranks exchange shards through it")
    writer = None if path is None else BankWriter(path, manifest, resume, create=rank == 0)
    barrier()

    feats, labels = [], []
    mine = [n for n in range(len(plan)) if n % world == rank]
    progress = tqdm(total=sum(plan[n][2] - plan[n][1] for n in mine), desc="memory bank", unit="img",
                    disable=rank != 0)
    for number in mine:
        epoch, start, end = plan[number]
        if writer is not None and writer.has_shard(number):
            progress.update(end - start)
            continue
        shard_feats, shard_labels = _extract_shard(dataset, extractor, spec, epoch, start, end, n_img,
                                                   batch_size, num_workers, device, progress)
        if writer is None:
            feats.append(shard_feats)
            labels.append(shard_labels)
        else:
            writer.write_shard(number, shard_feats, shard_labels)
    progress.close()
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
    return MemoryBank.load(path)


def subsample_bank(bank: MemoryBank, n_img: int, rule: str = "label_aware") -> MemoryBank:
    """Keep `n_img` rows per image of an unbounded bank by the builder's own sampling draws.

    Without augmentation this equals building the bounded bank directly (same seeds, same
    label statistics), so several memory sizes can share one feature extraction.
    """
    manifest = bank.manifest
    per_image, spec = manifest["patches_per_image"], manifest["spec"]
    if spec["memory_size"] is not None:
        raise ConfigError("subsample_bank needs an unbounded bank (memory.size=null)")
    features = np.concatenate(bank.feature_blocks).reshape(-1, per_image, bank.dim)
    labels = np.concatenate(bank.label_blocks).reshape(-1, per_image, bank.num_classes)
    keep = []
    for item in range(len(features)):
        epoch, index = divmod(item, manifest["num_images"])
        draws = generator(spec["seed"] + 1, epoch, index)
        keep.append(sample_patches(torch.from_numpy(labels[item].astype(np.float32)), n_img, rule, draws).numpy())
    rows = np.stack(keep)[..., None]  # (items, n_img, 1)
    new_spec = {**spec, "memory_size": n_img * len(features) // spec["epochs"], "sampling": rule}
    shards = [{**shard, "rows": (shard["images"][1] - shard["images"][0]) * n_img} for shard in manifest["shards"]]
    splits = np.cumsum([shard["rows"] for shard in shards])[:-1]  # one block per shard, as built
    return MemoryBank(
        np.split(np.take_along_axis(features, rows, 1).reshape(-1, bank.dim), splits),
        np.split(np.take_along_axis(labels, rows, 1).reshape(-1, bank.num_classes), splits),
        {**manifest, "patches_per_image": n_img, "spec": new_spec, "shards": shards, "count": n_img * len(features)})

"""Memory banks: per-patch features with soft labels, sampled, sharded on disk, resumable.

On disk a bank is a directory::

    <bank>/manifest.json                 what built it (backbone, features, data, sampling, ...)
    <bank>/shards/<s>.features.npy       (rows, D) float16/float32, unit rows
    <bank>/shards/<s>.labels.npy         (rows, C) float16/float32 class histograms

A build writes into `<bank>.partial/`; every shard is written to a temporary name and
renamed, so a killed build resumes at the first missing shard, and the finished
directory is renamed to `<bank>` only when complete. Every random choice of an image
depends only on (seed, epoch, image index), so a resumed bank equals an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from hummingbird_fungi.distributed import barrier, rank_and_world
from hummingbird_fungi.errors import BankMismatchError, ConfigError, DataError
from hummingbird_fungi.features.base import PatchFeatures
from hummingbird_fungi.data.transforms import sample_seed

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EMPTY_PATCH_SCORE = 1e6


# --------------------------------------------------------------------------- labels


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
    """Spec 4.2 steps 1-4 for one image: (N, C) counts -> (N,) rarity scores (smaller = keep)."""
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


# --------------------------------------------------------------------------- storage


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to `path` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """np.save through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def manifest_json(manifest: dict) -> bytes:
    """Canonical JSON bytes of a manifest (sorted keys, so equal manifests give equal files)."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def read_manifest(path: Path) -> dict:
    """Read `<bank>/manifest.json`, with an error naming the file."""
    file = Path(path) / "manifest.json"
    if not file.is_file():
        raise DataError(f"no memory bank at {path}: {file} is missing")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"corrupt memory bank manifest {file}: {exc}") from exc


def check_compatible(bank_features: dict, query_features: dict, where: str) -> None:
    """Refuse a bank whose feature manifest differs from the query extractor's."""
    keys = sorted(set(bank_features) | set(query_features))
    diffs = [f"{k}: bank={bank_features.get(k)!r} query={query_features.get(k)!r}"
             for k in keys if bank_features.get(k) != query_features.get(k)]
    if diffs:
        raise BankMismatchError(
            f"memory bank {where} was built with different features; refusing to mix them:\n  "
            + "\n  ".join(diffs))


@dataclass
class MemoryBank:
    """Unit-norm features (M, D) and soft labels (M, C), held as one or more row blocks."""

    feature_blocks: list[np.ndarray]
    label_blocks: list[np.ndarray]
    manifest: dict

    def __post_init__(self) -> None:
        sizes = [len(block) for block in self.feature_blocks]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @classmethod
    def from_arrays(cls, features: np.ndarray, labels: np.ndarray, manifest: dict) -> "MemoryBank":
        """A bank held in RAM (e.g. built from a few examples without saving)."""
        return cls([features], [labels], manifest)

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True, expect_features: dict | None = None) -> "MemoryBank":
        """Open a saved bank (memory-mapped by default); refuse it if `expect_features` differ."""
        path = Path(path)
        manifest = read_manifest(path)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise DataError(f"memory bank {path} has format {manifest.get('format_version')}, "
                            f"this version reads {FORMAT_VERSION}")
        if expect_features is not None:
            check_compatible(manifest["features"], expect_features, str(path))
        mode = "r" if mmap else None
        feats, labels = [], []
        for shard in manifest["shards"]:
            for kind, out in (("features", feats), ("labels", labels)):
                file = path / "shards" / f"{shard['name']}.{kind}.npy"
                if not file.is_file():
                    raise DataError(f"memory bank {path} is missing shard file {file}")
                out.append(np.load(file, mmap_mode=mode))
        if not feats:
            raise DataError(f"memory bank {path} holds no rows")
        return cls(feats, labels, manifest)

    def save(self, path: str | Path, extra: dict[str, np.ndarray] | None = None) -> Path:
        """Write the bank in the on-disk format (to `<path>.partial`, renamed when complete).

        `extra` arrays (e.g. a FUNGI support set) are written beside it as `<name>.npy`.
        """
        path = Path(path)
        if path.exists():
            raise DataError(f"memory bank {path} already exists; remove it or choose another path")
        partial = path.with_name(path.name + ".partial")
        (partial / "shards").mkdir(parents=True, exist_ok=True)
        built = self.manifest.get("shards", [])
        shards = []
        for number, (feats, labels) in enumerate(zip(self.feature_blocks, self.label_blocks)):
            feat_file, label_file = _shard_files(partial / "shards", number)
            save_npy_atomic(label_file, np.asarray(labels))
            save_npy_atomic(feat_file, np.asarray(feats))
            origin = built[number] if len(built) == len(self.feature_blocks) else {}  # epoch and image range
            shards.append({**origin, "name": f"{number:05d}", "rows": len(feats)})
        for name, array in (extra or {}).items():
            save_npy_atomic(partial / f"{name}.npy", np.asarray(array))
        manifest = {**self.manifest, "format_version": FORMAT_VERSION, "shards": shards, "count": self.count}
        write_atomic(partial / "manifest.json", manifest_json(manifest))
        os.replace(partial, path)
        log.info("memory bank saved to %s (%d rows)", path, self.count)
        return path

    @property
    def count(self) -> int:
        """Number of rows M."""
        return int(self.offsets[-1])

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.feature_blocks[0].shape[1])

    @property
    def num_classes(self) -> int:
        """Label dimension C."""
        return int(self.label_blocks[0].shape[1])

    def feature_chunks(self) -> Iterator[np.ndarray]:
        """The feature blocks in row order (for adding to an index shard by shard)."""
        yield from self.feature_blocks

    def _gather(self, blocks: list[np.ndarray], ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape) from row blocks -> (*ids.shape, width) float32."""
        flat = ids.reshape(-1).cpu().numpy()
        out = np.empty((flat.size, blocks[0].shape[1]), dtype=np.float32)
        block_of = np.searchsorted(self.offsets, flat, side="right") - 1
        for b in np.unique(block_of):
            where = np.nonzero(block_of == b)[0]
            local = flat[where] - self.offsets[b]
            order = np.argsort(local, kind="stable")  # sorted reads are kinder to memory maps
            out[where[order]] = blocks[b][local[order]]
        return torch.from_numpy(out).reshape(*ids.shape, -1)

    def gather_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Features of rows `ids` -> (*ids.shape, D) float32."""
        return self._gather(self.feature_blocks, ids)

    def gather_labels(self, ids: torch.Tensor) -> torch.Tensor:
        """Soft labels of rows `ids` -> (*ids.shape, C) float32."""
        return self._gather(self.label_blocks, ids)

    def row_images(self) -> torch.Tensor:
        """Dataset index of the image each row came from -> (M,) int64 (shards hold n rows per image)."""
        per_image, ids = self.manifest.get("patches_per_image"), []
        if not per_image or "shards" not in self.manifest:
            raise DataError("this memory bank does not record which image its rows come from")
        for shard in self.manifest["shards"]:
            start, end = shard["images"]
            if shard["rows"] != (end - start) * per_image:
                raise DataError(f"memory-bank shard {shard['name']} holds {shard['rows']} rows, "
                                f"not {per_image} for each of its {end - start} images")
            ids.append(torch.arange(start, end).repeat_interleave(per_image))
        return torch.cat(ids)

    def sample_features(self, count: int, seed: int = 0) -> torch.Tensor:
        """Features of `count` rows drawn uniformly without replacement (seeded) -> (min(count, M), D) float32."""
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randperm(self.count, generator=gen)[:count].sort().values  # sorted: sequential reads
        return self.gather_features(ids)


# --------------------------------------------------------------------------- building


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
    patch = extractor.backbone.patch_size
    info = dataset.info
    feats, labels = [], []
    for batch in loader:
        counts = patchify_labels(batch["mask"], patch, info.num_classes, spec.void_to_background)  # (B, N, C)
        num_patches = counts.shape[1]
        if n_img < num_patches:
            select = torch.stack([
                sample_patches(counts[i], n_img, spec.sampling,
                               torch.Generator().manual_seed(sample_seed(spec.seed + 1, epoch, int(idx))))
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
    grid = extractor.backbone.grid_size(height, width)
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
    shard_dir = partial = None
    if path is not None:
        path = Path(path)
        if path.exists():
            raise DataError(f"memory bank {path} already exists; remove it or choose another path")
        partial = path.with_name(path.name + ".partial")
        shard_dir = partial / "shards"
        if rank == 0:
            _open_partial(partial, manifest, resume)
        barrier()

    feats, labels, shards = [], [], []
    mine = [n for n in range(len(plan)) if n % world == rank]
    progress = tqdm(total=sum(plan[n][2] - plan[n][1] for n in mine), desc="memory bank", unit="img",
                    disable=rank != 0)
    for number in mine:
        epoch, start, end = plan[number]
        files = None if shard_dir is None else _shard_files(shard_dir, number)
        if files is not None and files[0].exists() and files[1].exists():
            progress.update(end - start)
            continue
        shard_feats, shard_labels = _extract_shard(dataset, extractor, spec, epoch, start, end, n_img,
                                                   batch_size, num_workers, device, progress)
        if files is None:
            feats.append(shard_feats)
            labels.append(shard_labels)
            shards.append({"name": f"{number:05d}", "epoch": epoch, "images": [start, end],
                           "rows": len(shard_feats)})
        else:
            save_npy_atomic(files[1], shard_labels)
            save_npy_atomic(files[0], shard_feats)
    progress.close()
    if path is None:
        manifest["shards"] = shards
        manifest["count"] = int(sum(s["rows"] for s in shards))
        return MemoryBank(feats, labels, manifest)

    barrier()
    if rank == 0:
        _seal(path, partial, manifest, plan)
    barrier()
    return MemoryBank.load(path)


def _shard_files(shard_dir: Path, number: int) -> tuple[Path, Path]:
    """Feature and label files of shard `number`."""
    return shard_dir / f"{number:05d}.features.npy", shard_dir / f"{number:05d}.labels.npy"


def _open_partial(partial: Path, manifest: dict, resume: bool) -> None:
    """Create `<bank>.partial/` or check that the unfinished build there is this one."""
    if partial.exists():
        old = read_manifest(partial)
        previous = old.get("build") or {k: v for k, v in old.items() if k not in ("shards", "count")}
        if not resume or previous != manifest:
            raise DataError(f"{partial} holds a different unfinished build; remove it to start over")
        log.info("resuming the memory-bank build in %s", partial)
    (partial / "shards").mkdir(parents=True, exist_ok=True)
    write_atomic(partial / "manifest.json", manifest_json({"build": manifest}))


def _seal(path: Path, partial: Path, manifest: dict, plan: list[tuple[int, int, int]]) -> None:
    """Check every shard is on disk, write the final manifest, rename `.partial` to the bank."""
    shards = []
    for number, (epoch, start, end) in enumerate(plan):
        feat_file, label_file = _shard_files(partial / "shards", number)
        if not (feat_file.exists() and label_file.exists()):
            raise DataError(f"memory-bank shard {feat_file} is missing; rerun the build to resume it")
        rows = np.load(feat_file, mmap_mode="r").shape[0]
        shards.append({"name": f"{number:05d}", "epoch": epoch, "images": [start, end], "rows": int(rows)})
    manifest = {**manifest, "shards": shards, "count": int(sum(s["rows"] for s in shards))}
    write_atomic(partial / "manifest.json", manifest_json(manifest))
    os.replace(partial, path)
    log.info("memory bank written to %s (%d rows)", path, manifest["count"])


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
        generator = torch.Generator().manual_seed(sample_seed(spec["seed"] + 1, epoch, index))
        keep.append(sample_patches(torch.from_numpy(labels[item].astype(np.float32)), n_img, rule, generator).numpy())
    rows = np.stack(keep)[..., None]  # (items, n_img, 1)
    new_spec = {**spec, "memory_size": n_img * len(features) // spec["epochs"], "sampling": rule}
    shards = [{**shard, "rows": (shard["images"][1] - shard["images"][0]) * n_img} for shard in manifest["shards"]]
    splits = np.cumsum([shard["rows"] for shard in shards])[:-1]  # one block per shard, as built
    return MemoryBank(
        np.split(np.take_along_axis(features, rows, 1).reshape(-1, bank.dim), splits),
        np.split(np.take_along_axis(labels, rows, 1).reshape(-1, bank.num_classes), splits),
        {**manifest, "patches_per_image": n_img, "spec": new_spec, "shards": shards, "count": n_img * len(features)})


__all__ = [
    "BankSpec", "MemoryBank", "build_memory_bank", "check_compatible", "label_aware_scores",
    "patchify_labels", "patches_per_image", "sample_patches", "soft_labels", "subsample_bank",
]

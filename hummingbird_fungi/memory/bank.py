"""The memory bank and its on-disk format, with the one writer of that format.

On disk a bank is a directory::

    <bank>/manifest.json                 what built it (encoder, features, data, sampling, ...)
    <bank>/shards/<s>.features.npy       (rows, D) float16/float32, unit rows
    <bank>/shards/<s>.labels.npy         (rows, C) float16/float32 class histograms

`BankWriter` writes into `<bank>.partial/`; every shard goes to a temporary name and is renamed,
so a killed build resumes at the first missing shard, and the directory becomes `<bank>` only
when `seal` has checked every shard.
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

from hummingbird_fungi.errors import BankMismatchError, DataError
from hummingbird_fungi.fileio import save_npy_atomic, write_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def shard_files(bank_dir: Path, name: str) -> tuple[Path, Path]:
    """Feature and label files of the shard `name` ('00012') in a bank (or `.partial`) directory."""
    return bank_dir / "shards" / f"{name}.features.npy", bank_dir / "shards" / f"{name}.labels.npy"


def partial_path(bank: str | Path) -> Path:
    """Where an unfinished build of `bank` lives: `<bank>.partial`."""
    bank = Path(bank)
    return bank.with_name(bank.name + ".partial")


def shard_name(number: int) -> str:
    """The file-name stem of shard `number`."""
    return f"{number:05d}"


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
            for file, out in zip(shard_files(path, shard["name"]), (feats, labels)):
                if not file.is_file():
                    raise DataError(f"memory bank {path} is missing shard file {file}")
                out.append(np.load(file, mmap_mode=mode))
        if not feats:
            raise DataError(f"memory bank {path} holds no rows")
        return cls(feats, labels, manifest)

    def save(self, path: str | Path, extra: dict[str, np.ndarray] | None = None) -> Path:
        """Write the bank in the on-disk format (sealed when complete); `extra` arrays go beside it as `<name>.npy`."""
        built = self.manifest.get("shards", [])
        writer = BankWriter(path, {k: v for k, v in self.manifest.items() if k not in ("shards", "count")})
        shards = []
        for number, (feats, labels) in enumerate(zip(self.feature_blocks, self.label_blocks)):
            writer.write_shard(number, feats, labels)
            origin = built[number] if len(built) == len(self.feature_blocks) else {}  # epoch and image range
            shards.append({**origin, "name": shard_name(number)})
        for name, array in (extra or {}).items():
            writer.write_array(name, array)
        return writer.seal(shards)

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


class BankWriter:
    """Writes a bank into `<path>.partial/` shard by shard and seals it into `<path>` when complete.

    `build` is the manifest of the bank being built: an unfinished build with the same manifest
    is resumed (its finished shards are kept), one with another manifest is refused.
    """

    def __init__(self, path: str | Path, build: dict[str, Any], resume: bool = True, create: bool = True) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.build = build
        if self.path.exists():
            raise DataError(f"memory bank {self.path} already exists; remove it or choose another path")
        if create:
            self._open(resume)

    def _open(self, resume: bool) -> None:
        """Create `<bank>.partial/` or check that the unfinished build there is this one."""
        if self.partial.exists():
            old = read_manifest(self.partial)
            previous = old.get("build") or {k: v for k, v in old.items() if k not in ("shards", "count")}
            if not resume or previous != self.build:
                raise DataError(f"{self.partial} holds a different unfinished build; remove it to start over")
            log.info("resuming the memory-bank build in %s", self.partial)
        (self.partial / "shards").mkdir(parents=True, exist_ok=True)
        write_atomic(self.partial / "manifest.json", manifest_json({"build": self.build}))

    def has_shard(self, number: int) -> bool:
        """Whether shard `number` is complete on disk."""
        return all(file.exists() for file in shard_files(self.partial, shard_name(number)))

    def write_shard(self, number: int, features: np.ndarray, labels: np.ndarray) -> None:
        """Write shard `number` (labels first: a shard is complete once its feature file exists)."""
        feat_file, label_file = shard_files(self.partial, shard_name(number))
        save_npy_atomic(label_file, np.asarray(labels))
        save_npy_atomic(feat_file, np.asarray(features))

    def write_array(self, name: str, array: np.ndarray) -> None:
        """An extra array saved beside the bank as `<name>.npy` (e.g. a FUNGI support set)."""
        save_npy_atomic(self.partial / f"{name}.npy", np.asarray(array))

    def seal(self, shards: list[dict[str, Any]]) -> Path:
        """Check every listed shard is on disk, write the final manifest, rename `.partial` to the bank."""
        for shard in shards:
            feat_file, _ = shard_files(self.partial, shard["name"])
            if not all(file.exists() for file in shard_files(self.partial, shard["name"])):
                raise DataError(f"memory-bank shard {feat_file} is missing; rerun the build to resume it")
            shard["rows"] = int(np.load(feat_file, mmap_mode="r").shape[0])
        manifest = {**self.build, "format_version": FORMAT_VERSION, "shards": shards,
                    "count": int(sum(s["rows"] for s in shards))}
        write_atomic(self.partial / "manifest.json", manifest_json(manifest))
        os.replace(self.partial, self.path)
        log.info("memory bank written to %s (%d rows)", self.path, manifest["count"])
        return self.path

"""The memory bank and its on-disk format, with the one writer of that format.

On disk a bank is a directory::

    <bank>/manifest.json                 what built it (encoder, features, data, sampling, ...)
    <bank>/shards/<s>.features.npy       (rows, D) float16/float32, unit rows
    <bank>/shards/<s>.labels.npy         (rows, C) float16/float32 class histograms
    <bank>/transforms/<key>/             feature transforms fitted on the rows (memory.build), stored rows stay raw

`BankWriter` writes into `<bank>.partial/` while holding a lock on `<bank>.lock`; every file goes
to a temporary name and is renamed, and a shard counts as finished once its record
`shards/<s>.json` (rows, and a digest of the files it was built from) is written last. A killed
build resumes with every finished shard whose files pass their checks and whose source files are
unchanged, and rebuilds the others; the directory becomes `<bank>` only when `seal` has verified
every shard and moved the records into the manifest. Loading verifies each shard file against its
header and the manifest, so a truncated file is named instead of failing inside numpy.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Iterator, NoReturn, Protocol

import numpy as np
import torch

from hummingbird_fungi.data.segmentation import palette_problem
from hummingbird_fungi.errors import BankMismatchError, DataError
from hummingbird_fungi.fileio import json_safe, make_dirs, remove_temp_files, save_npy_atomic, write_atomic
from hummingbird_fungi.runtime import sample_ids

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the recipe (spec) uses the memory options names (size, augmentation_epochs)
SEALED_KEYS = ("features", "input_size", "num_classes", "shards", "count")  # what a finished bank records
FEATURE_KEYS = ("kind", "backbone", "options")
TRANSFORM_ROWS = 65536  # rows mapped at a time by a bank's feature transform


class RowTransform(Protocol):
    """A map of raw feature rows (n, D) -> (n, d) float32 unit rows (the pipeline's `features.transform`)."""

    @property
    def dim(self) -> int:
        """Output dimension d."""

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, D) -> (n, d) float32."""


def shard_files(bank_dir: Path, name: str) -> tuple[Path, Path]:
    """Feature and label files of the shard `name` ('00012') in a bank (or `.partial`) directory."""
    return bank_dir / "shards" / f"{name}.features.npy", bank_dir / "shards" / f"{name}.labels.npy"


def shard_record(bank_dir: Path, name: str) -> Path:
    """The record of a finished shard in a `.partial` build (written after its two files)."""
    return bank_dir / "shards" / f"{name}.json"


def partial_path(bank: str | Path) -> Path:
    """Where an unfinished build of `bank` lives: `<bank>.partial`."""
    bank = Path(bank)
    return bank.with_name(bank.name + ".partial")


def lock_path(bank: str | Path) -> Path:
    """The lock file a build of `bank` holds: `<bank>.lock`."""
    bank = Path(bank)
    return bank.with_name(bank.name + ".lock")


def shard_name(number: int) -> str:
    """The file-name stem of shard `number`."""
    return f"{number:05d}"


def manifest_json(manifest: dict) -> bytes:
    """Canonical strict JSON bytes of a manifest (sorted keys, so equal manifests give equal files)."""
    return (json.dumps(json_safe(manifest), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def read_manifest(path: str | Path, sealed: bool = True) -> dict:
    """Read `<bank>/manifest.json`, with errors naming the file; `sealed`: it must be a finished bank of this format
    whose fields agree with each other and with every shard file's header (`_check_consistent`)."""
    path = Path(path)
    file = path / "manifest.json"
    if not file.is_file():
        unfinished = partial_path(path)
        hint = f" (an interrupted build is in {unfinished}: rerun it to finish)" if unfinished.is_dir() else ""
        raise DataError(f"no memory bank at {path}: {file} is missing{hint}")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"corrupt memory bank manifest {file}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise DataError(f"corrupt memory bank manifest {file}: not a JSON object")
    if sealed:
        _check_sealed(manifest, path, file)
        _check_consistent(manifest, path, file)
    return manifest


def _check_sealed(manifest: dict, path: Path, file: Path) -> None:
    """Refuse an unfinished build, another format version, or a manifest without what loading needs."""
    if "build" in manifest or path.name.endswith(".partial"):
        raise DataError(f"{path} is an unfinished memory-bank build, not a bank: rerun the build that wrote it "
                        f"to finish it, then use {path.with_name(path.name.removesuffix('.partial'))}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"memory bank {path} has format {manifest.get('format_version')}, "
                        f"this version reads {FORMAT_VERSION}")
    features = manifest.get("features")
    missing = [key for key in SEALED_KEYS if key not in manifest] + [
        f"features.{key}" for key in FEATURE_KEYS if not isinstance(features, dict) or key not in features]
    if not missing and not all(isinstance(s, dict) and "name" in s for s in manifest["shards"]):
        missing = ["shards[].name"]
    if missing:
        raise DataError(f"memory bank manifest {file} lacks {', '.join(missing)}: damaged, or not written by "
                        f"this toolkit")


def _check_consistent(manifest: dict, path: Path, file: Path) -> None:
    """Refuse a sealed manifest whose fields disagree: class names and palette vs num_classes, each shard's
    files (npy headers) vs its rows, features.dim and num_classes, and count vs the shards' rows."""
    def refuse(problem: str) -> NoReturn:
        raise DataError(f"memory bank manifest {file}: {problem}; the bank is damaged or was edited, rebuild it")

    num_classes, dim = manifest["num_classes"], manifest["features"].get("dim")
    for key, value in (("num_classes", num_classes), ("features.dim", dim)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            refuse(f"{key}={value!r} is not a positive integer")
    names = manifest.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != num_classes):
        refuse(f"class_names={names!r} does not name each of the num_classes={num_classes} classes")
    palette = manifest.get("palette")
    problem = None if palette is None else palette_problem(palette, num_classes)
    if problem:
        refuse(f"palette {problem}")
    rows = sum(verify_shard(path, shard["name"], shard.get("rows"), (dim, num_classes))
               for shard in manifest["shards"])
    if manifest["count"] != rows:
        refuse(f"count={manifest['count']!r} but its shards hold {rows} rows")


def manifest_differences(recorded: Any, expected: Any, key: str = "") -> list[str]:
    """'key: bank=..., this run=...' for each dotted key whose value differs (mappings compared key by key)."""
    if isinstance(recorded, dict) and isinstance(expected, dict):
        return [diff for name in sorted(set(recorded) | set(expected))
                for diff in manifest_differences(recorded.get(name), expected.get(name),
                                                 f"{key}.{name}" if key else name)]
    return [] if recorded == expected else [f"{key}: bank={recorded!r}, this run={expected!r}"]


def check_compatible(recorded: dict, expected: dict, where: str, what: str = "features") -> None:
    """Refuse a bank whose manifest differs from what this run expects (the keys of `expected`), naming each key."""
    expected = json.loads(manifest_json(expected))
    diffs = manifest_differences({key: recorded.get(key) for key in expected}, expected)
    if diffs:
        raise BankMismatchError(
            f"memory bank {where} was built with different {what}; refusing to reuse it (remove it, choose "
            f"another memory.path, or run with what it records):\n  " + "\n  ".join(diffs))


def npy_shape(file: Path) -> tuple[int, ...]:
    """Shape of a .npy file whose size matches its header; DataError naming a missing, truncated or foreign file."""
    try:
        with open(file, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(handle)
            expected = handle.tell() + math.prod(shape) * dtype.itemsize
            size = os.fstat(handle.fileno()).st_size
    except FileNotFoundError as exc:
        raise DataError(f"memory-bank file {file} is missing") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"memory-bank file {file} is truncated or not a .npy file: {exc}") from exc
    if size != expected:
        raise DataError(f"memory-bank file {file} is truncated or damaged: {size} bytes where its header "
                        f"describes {expected}")
    return shape


def verify_shard(bank_dir: Path, name: str, rows: int | None = None,
                 widths: tuple[int | None, int] | None = None) -> int:
    """Check both files of shard `name` (sizes, shapes, equal row counts, `rows` and the widths (D, C) of features and
    labels if given; D None: unchecked); its row count."""
    feat_file, label_file = shard_files(bank_dir, name)
    feats, labels = npy_shape(feat_file), npy_shape(label_file)
    if len(feats) != 2 or len(labels) != 2 or feats[0] != labels[0]:
        raise DataError(f"memory-bank shard {feat_file} has shape {feats} but {label_file} has {labels}")
    if rows is not None and feats[0] != rows:
        raise DataError(f"memory-bank shard file {feat_file} holds {feats[0]} rows where its record says {rows}")
    if widths is not None:
        for file, shape, width, key in ((feat_file, feats, widths[0], "features.dim"),
                                        (label_file, labels, widths[1], "num_classes")):
            if width is not None and shape[1] != width:
                raise DataError(f"memory-bank shard file {file} has {shape[1]} columns where the manifest says "
                                f"{key}={width}")
    return int(feats[0])


@dataclass
class MemoryBank:
    """Unit-norm features (M, D) and soft labels (M, C), held as one or more row blocks; an optional `transform`
    maps feature rows as they are read (the stored rows stay raw)."""

    feature_blocks: list[np.ndarray]
    label_blocks: list[np.ndarray]
    manifest: dict
    transform: RowTransform | None = None

    def __post_init__(self) -> None:
        sizes = [len(block) for block in self.feature_blocks]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @classmethod
    def from_arrays(cls, features: np.ndarray, labels: np.ndarray, manifest: dict) -> "MemoryBank":
        """A bank held in RAM (e.g. built from a few examples without saving)."""
        return cls([features], [labels], manifest)

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True, expect_features: dict | None = None,
             expect_build: dict | None = None) -> "MemoryBank":
        """Open a saved bank (memory-mapped by default), every shard verified by `read_manifest`; refuse it
        (BankMismatchError) if `expect_features` differ, or if what it records differs from the build manifest
        `expect_build`."""
        path = Path(path)
        manifest = read_manifest(path)
        if expect_features is not None:
            check_compatible(manifest["features"], expect_features, str(path))
        if expect_build is not None:
            check_compatible(manifest, {k: v for k, v in expect_build.items() if k != "features"}, str(path),
                             what="settings")
        mode = "r" if mmap else None
        feats, labels = [], []
        for shard in manifest["shards"]:
            for file, out in zip(shard_files(path, shard["name"]), (feats, labels)):
                out.append(np.load(file, mmap_mode=mode))
        if not feats:
            raise DataError(f"memory bank {path} holds no rows")
        return cls(feats, labels, manifest)

    def save(self, path: str | Path, extra: dict[str, np.ndarray] | None = None) -> Path:
        """Write the bank in the on-disk format (sealed when complete); `extra` arrays go beside it as `<name>.npy`."""
        built = self.manifest.get("shards", [])
        writer = BankWriter(path, {k: v for k, v in self.manifest.items() if k not in ("shards", "count")})
        try:
            shards = []
            for number, (feats, labels) in enumerate(zip(self.feature_blocks, self.label_blocks)):
                writer.write_shard(number, feats, labels)
                origin = built[number] if len(built) == len(self.feature_blocks) else {}  # epoch and image range
                shards.append({**origin, "name": shard_name(number)})
            for name, array in (extra or {}).items():
                writer.write_array(name, array)
            return writer.seal(shards)
        finally:
            writer.close()

    @property
    def count(self) -> int:
        """Number of rows M."""
        return int(self.offsets[-1])

    def with_transform(self, transform: RowTransform | None) -> "MemoryBank":
        """This bank (sharing its row blocks) read through `transform` (None: raw rows)."""
        return replace(self, transform=transform)

    @property
    def stored_dim(self) -> int:
        """Width of the stored feature rows (before any transform)."""
        return int(self.feature_blocks[0].shape[1])

    @property
    def dim(self) -> int:
        """Feature dimension D as read (after the transform, if any)."""
        return self.stored_dim if self.transform is None else self.transform.dim

    @property
    def num_classes(self) -> int:
        """Label dimension C."""
        return int(self.label_blocks[0].shape[1])

    def feature_chunks(self) -> Iterator[np.ndarray]:
        """The feature blocks in row order (for adding to an index shard by shard), each mapped by the transform
        when there is one (TRANSFORM_ROWS rows at a time, kept in the block's stored dtype)."""
        for block in self.feature_blocks:
            if self.transform is None:
                yield block
                continue
            out = np.empty((len(block), self.dim), dtype=block.dtype)
            for start in range(0, len(block), TRANSFORM_ROWS):
                rows = torch.from_numpy(np.asarray(block[start:start + TRANSFORM_ROWS], dtype=np.float32))
                out[start:start + TRANSFORM_ROWS] = self.transform(rows).numpy()
            yield out

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
        """Features of rows `ids` -> (*ids.shape, D) float32, mapped by the transform when there is one."""
        if self.transform is None:
            return self._gather(self.feature_blocks, ids)
        unique, inverse = torch.unique(ids, return_inverse=True)  # rows shared by several queries are mapped once
        return self.transform(self._gather(self.feature_blocks, unique))[inverse]

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
        """Features of `count` rows drawn uniformly without replacement (seeded) -> (min(count, M), D) float32, as
        `gather_features` reads them (mapped by the transform when there is one)."""
        return self.gather_features(sample_ids(self.count, count, seed))  # sorted: sequential reads


class BankWriter:
    """Writes a bank into `<path>.partial/` shard by shard and seals it into `<path>` when complete.

    `build` is the manifest of the bank being built: an unfinished build with the same manifest
    is resumed (its finished, intact and up-to-date shards are kept), one with another manifest is
    refused. The creating writer holds an exclusive lock on `<path>.lock` until `seal` or `close`,
    so a second build of the same path waits for the first instead of writing over it.
    """

    def __init__(self, path: str | Path, build: dict[str, Any], resume: bool = True, create: bool = True) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.build = json.loads(manifest_json(build))
        self._lock: IO | None = None
        if not create:  # another rank creates the build and holds the lock
            self._refuse_existing(waited=False)
            return
        waited = self._take_lock()
        try:
            self._refuse_existing(waited)
            self._open(resume)
        except BaseException:
            self.close()
            raise

    def _refuse_existing(self, waited: bool) -> None:
        """A finished bank is never written over."""
        if self.path.exists():
            raise DataError(f"memory bank {self.path} already exists"
                            f"{' (another build finished it while this one waited)' if waited else ''}; "
                            f"remove it or choose another path")

    def _take_lock(self) -> bool:
        """Lock `<bank>.lock`, waiting (with a log line) while another build holds it; whether it waited."""
        file = lock_path(self.path)
        make_dirs(file.parent)
        try:
            self._lock = open(file, "a")
        except OSError as exc:
            raise DataError(f"cannot open the lock file {file}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            log.warning("another build of %s holds %s; waiting for it to finish", self.path, file)
            fcntl.flock(self._lock, fcntl.LOCK_EX)
            log.info("lock %s acquired", file)
            return True

    def close(self) -> None:
        """Release the lock (also done by `seal`); the writer writes nothing more."""
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _open(self, resume: bool) -> None:
        """Create `<bank>.partial/`, or check that the unfinished build there is this one and clean it up."""
        shards_dir = self.partial / "shards"
        if self.partial.exists():
            old = read_manifest(self.partial, sealed=False)
            if not resume or _recipe(old.get("build") or old) != _recipe(self.build):
                raise DataError(f"{self.partial} holds a different unfinished build; remove it to start over")
            log.info("resuming the memory-bank build in %s", self.partial)
            removed = remove_temp_files(shards_dir) + remove_temp_files(self.partial)
            if removed:
                log.info("removed %d temporary files of the killed build: %s", len(removed),
                         ", ".join(p.name for p in removed[:5]))
            for shard in old.get("shards", []):  # killed while sealing: the records are in the final manifest
                record = shard_record(self.partial, shard["name"])
                if not record.exists():
                    write_atomic(record, manifest_json({"rows": shard.get("rows"), "sources": shard.get("sources")}))
        make_dirs(shards_dir)
        write_atomic(self.partial / "manifest.json", manifest_json({"build": self.build}))

    def has_shard(self, number: int, sources: str | None = None) -> bool:
        """Whether shard `number` is finished, its files intact and built from `sources` (else it is rebuilt)."""
        name = shard_name(number)
        record_file = shard_record(self.partial, name)
        if not record_file.is_file():
            return False
        try:
            record = json.loads(record_file.read_text())
            verify_shard(self.partial, name, record["rows"])
        except (OSError, ValueError, KeyError, TypeError) as exc:  # DataError is a ValueError
            log.warning("rebuilding shard %s: %s", name, exc)
            return False
        if record.get("sources") != sources:
            log.warning("rebuilding shard %s: its images or masks changed since it was built (%s)", name, record_file)
            return False
        return True

    def write_shard(self, number: int, features: np.ndarray, labels: np.ndarray, sources: str | None = None) -> None:
        """Write shard `number` and then its record (`sources`: a digest of the files it was built from)."""
        name = shard_name(number)
        feat_file, label_file = shard_files(self.partial, name)
        shard_record(self.partial, name).unlink(missing_ok=True)  # unfinished until the record is back
        save_npy_atomic(label_file, np.asarray(labels))
        save_npy_atomic(feat_file, np.asarray(features))
        write_atomic(shard_record(self.partial, name), manifest_json({"rows": len(features), "sources": sources}))

    def write_array(self, name: str, array: np.ndarray) -> None:
        """An extra array saved beside the bank as `<name>.npy` (e.g. a FUNGI support set)."""
        save_npy_atomic(self.partial / f"{name}.npy", np.asarray(array))

    def seal(self, shards: list[dict[str, Any]]) -> Path:
        """Verify every listed shard, write the final manifest (with the shard records), rename `.partial` to
        the bank."""
        for shard in shards:
            record_file = shard_record(self.partial, shard["name"])
            if not record_file.is_file():
                raise DataError(f"memory-bank shard {shard_files(self.partial, shard['name'])[0]} is unfinished; "
                                f"rerun the build to resume it")
            record = json.loads(record_file.read_text())
            shard["rows"] = verify_shard(self.partial, shard["name"], record.get("rows"))
            if record.get("sources") is not None:
                shard["sources"] = record["sources"]
        manifest = {**self.build, "format_version": FORMAT_VERSION, "shards": shards,
                    "count": int(sum(s["rows"] for s in shards))}
        write_atomic(self.partial / "manifest.json", manifest_json(manifest))
        for shard in shards:
            shard_record(self.partial, shard["name"]).unlink()
        os.replace(self.partial, self.path)
        self.close()
        log.info("memory bank written to %s (%d rows)", self.path, manifest["count"])
        return self.path


def _recipe(manifest: dict) -> dict:
    """A build manifest without what sealing adds (shards, count, format version)."""
    return {k: v for k, v in manifest.items() if k not in ("shards", "count", "format_version")}

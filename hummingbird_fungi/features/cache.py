"""On-disk cache of feature rows, one directory per key: the kNN run's image features (per backbone,
objective, dataset, split) and the feature study's patch parts (tokens, projected gradients, masks).

Layout: ``<root>/<part>/.../<leaf>-<hash>/`` (e.g. ``<backbone>/<dataset>/<split>/<objective>``) holding
``manifest.json`` (the full key: backbone, weights, objective options, projection, data
fingerprint, input size, seeds; the row count, dimension, chunk size and a dtype other than
float32) and ``chunk_<i>.npy`` files of ``chunk_size`` rows each. Every file is written to a
temporary name and renamed, so a chunk on disk is always complete: an interrupted run
resumes from the chunks already there. The hash covers the whole manifest, so different
settings never share a directory. Without a root the chunks stay in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from hummingbird_fungi.errors import DataError
from hummingbird_fungi.fileio import save_npy_atomic, write_atomic
from hummingbird_fungi.memory.bank import manifest_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def slug(text: str) -> str:
    """A file-name-safe version of `text`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


def key_hash(manifest: dict[str, Any]) -> str:
    """Short stable hash of a manifest (canonical JSON)."""
    return hashlib.sha1(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:12]


class FeatureCache:
    """Rows (count, dim) of one set of images in `dtype`, computed and stored chunk by chunk."""

    def __init__(self, root: str | Path | None, parts: tuple[str, ...], key: dict[str, Any],
                 count: int, dim: int, chunk_size: int = 512, dtype: str = "float32") -> None:
        if count < 1 or dim < 1 or chunk_size < 1:
            raise ValueError(f"cache needs count, dim, chunk_size >= 1, got {count}, {dim}, {chunk_size}")
        self.count, self.dim, self.chunk_size, self.dtype = count, dim, chunk_size, np.dtype(dtype)
        # float32 stays out of the manifest: caches written before other dtypes keep their hash
        self.manifest = {"format_version": FORMAT_VERSION, "key": key, "count": count, "dim": dim,
                         "chunk_size": chunk_size, **({} if self.dtype == np.float32 else {"dtype": self.dtype.name})}
        self._memory: dict[int, np.ndarray] = {}
        self.path: Path | None = None
        if root is not None:
            *dirs, leaf = (slug(p) for p in parts)
            self.path = Path(root).joinpath(*dirs, f"{leaf}-{key_hash(self.manifest)}")
            self._open()

    @property
    def num_chunks(self) -> int:
        """Number of chunks covering all rows."""
        return -(-self.count // self.chunk_size)

    def bounds(self, index: int) -> tuple[int, int]:
        """Rows [start, stop) of chunk `index`."""
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.count)

    def _open(self) -> None:
        """Create the directory and manifest, or check an existing manifest matches."""
        assert self.path is not None
        manifest_file = self.path / "manifest.json"
        if manifest_file.is_file():
            try:
                stored = json.loads(manifest_file.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise DataError(f"corrupt feature cache manifest {manifest_file}: {exc}") from exc
            stored.pop("complete", None)
            if json.loads(manifest_json(stored)) != json.loads(manifest_json(self.manifest)):
                raise DataError(f"feature cache {self.path} holds a different key; delete it to rebuild")
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(manifest_file, manifest_json({**self.manifest, "complete": False}))

    def _chunk_file(self, index: int) -> Path:
        """File of chunk `index`."""
        assert self.path is not None
        return self.path / f"chunk_{index:05d}.npy"

    def has(self, index: int) -> bool:
        """Whether chunk `index` is stored with the right shape."""
        if self.path is None:
            return index in self._memory
        file = self._chunk_file(index)
        if not file.is_file():
            return False
        start, stop = self.bounds(index)
        try:
            shape = np.load(file, mmap_mode="r").shape
        except (OSError, ValueError):
            shape = ()
        if shape != (stop - start, self.dim):
            log.warning("feature cache chunk %s is unreadable or has shape %s; recomputing", file, shape)
            return False
        return True

    def missing(self) -> Iterator[tuple[int, int, int]]:
        """(index, start, stop) of every chunk not stored yet."""
        for index in range(self.num_chunks):
            if not self.has(index):
                yield (index, *self.bounds(index))

    def missing_rows(self) -> int:
        """Number of rows still to compute."""
        return sum(stop - start for _, start, stop in self.missing())

    def put(self, index: int, features: np.ndarray) -> None:
        """Store chunk `index` (rows, dim) atomically, cast to the cache's dtype."""
        start, stop = self.bounds(index)
        features = np.ascontiguousarray(features, dtype=self.dtype)
        if features.shape != (stop - start, self.dim):
            raise ValueError(f"chunk {index} must be ({stop - start}, {self.dim}), got {features.shape}")
        if self.path is None:
            self._memory[index] = features
            return
        save_npy_atomic(self._chunk_file(index), features)

    def load(self) -> np.ndarray:
        """All rows (count, dim) in the cache's dtype; every chunk must be stored."""
        missing = [index for index, _, _ in self.missing()]
        if missing:
            raise DataError(f"feature cache {self.path or '(memory)'} lacks chunks {missing[:5]}")
        if self.path is None:
            return np.concatenate([self._memory[i] for i in range(self.num_chunks)])
        features = np.concatenate([np.load(self._chunk_file(i)) for i in range(self.num_chunks)])
        write_atomic(self.path / "manifest.json", manifest_json({**self.manifest, "complete": True}))
        return features

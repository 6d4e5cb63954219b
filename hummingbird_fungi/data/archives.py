"""Dataset roots inside uncompressed tar archives, read member by member without extracting anything.

`as_path` turns 'camvid.tar' (an existing file) or 'all.tar!/camvid' (a folder inside one) into a
`TarPath`, a small read-only stand-in for `pathlib.Path` that the dataset layouts walk like a folder;
every other value stays a `Path`. An archive is indexed once (member offsets and the folder tree) and
its members are read by seeking in a file handle that is reopened in every process, so DataLoader
workers (forked or spawned) never share a file offset.
"""

from __future__ import annotations

import fnmatch
import io
import logging
import os
import re
import tarfile
import threading
from pathlib import Path, PurePosixPath
from typing import IO, Any, Iterator

from hummingbird_fungi.errors import DataError

log = logging.getLogger(__name__)

_TAR_ROOT = re.compile(r"^(?P<archive>.+?\.tar)!(?:/(?P<inner>.*))?$", re.IGNORECASE)


def _member_name(name: str) -> str:
    """A member name relative to the archive root without '.' or leading '/' ('' for the root itself)."""
    normal = str(PurePosixPath(name.lstrip("/")))
    return "" if normal == "." else normal


class TarArchive:
    """An uncompressed tar file indexed once: regular members by name (data offset, size) and folder contents."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[str, tuple[int, int]] = {}
        self.folders: dict[str, set[str]] = {"": set()}  # folder -> names of its children
        skipped = 0
        try:
            with tarfile.open(path, mode="r:") as tar:  # "r:": no compression, so members can be read by seeking
                for member in tar:
                    name = _member_name(member.name)
                    if member.isfile():
                        self.files[name] = (member.offset_data, member.size)
                        self._add_parents(name)
                    elif member.isdir():
                        self._add_parents(name)
                        self.folders.setdefault(name, set())
                    else:
                        skipped += 1
        except (OSError, tarfile.TarError) as err:
            raise DataError(f"cannot index {path} as an uncompressed tar archive (compressed archives cannot be "
                            f"read member by member; decompress them first): {err}") from err
        if skipped:
            log.warning("%s: %d links or special members are not followed", path, skipped)
        log.info("indexed %s: %d files", path, len(self.files))
        self._handle: IO[bytes] | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def _add_parents(self, name: str) -> None:
        """Record `name` in its parent folder, and each ancestor in its own parent."""
        child = PurePosixPath(name)
        while str(child) not in ("", "."):
            parent = "" if str(child.parent) == "." else str(child.parent)
            self.folders.setdefault(parent, set()).add(child.name)
            child = child.parent

    def read(self, name: str) -> bytes:
        """The bytes of member `name`; FileNotFoundError if it is not a regular member."""
        if name not in self.files:
            raise FileNotFoundError(f"{self.path} has no member {name!r}")
        offset, size = self.files[name]
        if self._pid != os.getpid():  # first use in this process (a forked worker inherits the parent's handle)
            self._handle, self._pid, self._lock = open(self.path, "rb"), os.getpid(), threading.Lock()
        with self._lock:
            self._handle.seek(offset)  # type: ignore[union-attr]
            return self._handle.read(size)  # type: ignore[union-attr]

    def __getstate__(self) -> dict[str, Any]:
        """The index without the file handle (a spawned worker opens its own)."""
        return {"path": self.path, "files": self.files, "folders": self.folders}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _handle=None, _pid=None, _lock=threading.Lock())


_ARCHIVES: dict[tuple[str, int, int], TarArchive] = {}


def open_archive(path: Path) -> TarArchive:
    """The index of the tar file at `path`, built on first use and kept while the file is unchanged."""
    try:
        stat = path.stat()
    except OSError as err:
        raise DataError(f"archive {path} cannot be read: {err}") from err
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _ARCHIVES:
        _ARCHIVES[key] = TarArchive(path)
    return _ARCHIVES[key]


class TarPath:
    """A file or folder inside a tar archive, with the read-only subset of `pathlib.Path` the datasets use."""

    def __init__(self, archive: str | os.PathLike, inner: str | PurePosixPath = "",
                 index: TarArchive | None = None) -> None:
        self.archive = Path(archive)
        self.inner = PurePosixPath(inner)
        self._index = index

    @property
    def index(self) -> TarArchive:
        """The archive's index (built on first use)."""
        if self._index is None:
            self._index = open_archive(self.archive)
        return self._index

    @property
    def _key(self) -> str:
        """The member name ('' for the archive's root folder)."""
        return "" if str(self.inner) == "." else str(self.inner)

    def __truediv__(self, other: str) -> TarPath:
        return TarPath(self.archive, self.inner / other, self._index)

    @property
    def name(self) -> str:
        """The last path component (the archive's stem at its root)."""
        return self.inner.name if self._key else self.archive.stem

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> TarPath:
        return TarPath(self.archive, self.inner.parent, self._index)

    def is_file(self) -> bool:
        return self._key in self.index.files

    def is_dir(self) -> bool:
        return self._key in self.index.folders

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def iterdir(self) -> Iterator[TarPath]:
        """The children of this folder, sorted by name."""
        if not self.is_dir():
            raise NotADirectoryError(f"{self} is not a folder")
        return (self / name for name in sorted(self.index.folders[self._key]))

    def glob(self, pattern: str) -> Iterator[TarPath]:
        """Children whose names match a one-component pattern such as '*.png'."""
        if "/" in pattern or "**" in pattern:
            raise ValueError(f"TarPath.glob takes one path component, not {pattern!r}")
        return (child for child in self.iterdir() if fnmatch.fnmatchcase(child.name, pattern))

    def read_bytes(self) -> bytes:
        return self.index.read(self._key)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open(self, mode: str = "rb") -> IO[bytes]:
        """The member's bytes as a binary stream (read-only)."""
        if mode != "rb":
            raise ValueError(f"members of {self.archive} can only be opened with mode 'rb', not {mode!r}")
        return io.BytesIO(self.read_bytes())

    def __str__(self) -> str:
        return f"{self.archive}!/{self._key}" if self._key else str(self.archive)

    def __repr__(self) -> str:
        return f"TarPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TarPath) and (self.archive, self.inner) == (other.archive, other.inner)

    def __hash__(self) -> int:
        return hash((self.archive, self.inner))

    def __lt__(self, other: TarPath) -> bool:
        return (str(self.archive), self.inner.parts) < (str(other.archive), other.inner.parts)


DataPath = Path | TarPath


def as_path(value: str | os.PathLike | TarPath) -> DataPath:
    """A `TarPath` for 'x.tar' (an existing file) or 'x.tar!/folder/file', otherwise a `Path`."""
    if isinstance(value, TarPath):
        return value
    text = os.fspath(value)
    match = _TAR_ROOT.match(text)
    if match:
        return TarPath(match["archive"], match["inner"] or "")
    if text.lower().endswith(".tar") and os.path.isfile(text):
        return TarPath(text)
    return Path(text)

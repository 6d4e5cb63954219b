"""Where the toolkit writes: atomic writes and the checks of output locations made before any work.

Every file goes through a fresh temporary file in its own folder (created exclusively, so a planted
symlink is never followed), is fsynced and renamed over the target with `os.replace` (which
replaces a symlink itself, not what it points to). An OSError while writing (a full disk, a
read-only folder) becomes a DataError naming the file, and no partial file is left behind.
"""

from __future__ import annotations

import io
import json
import math
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

import numpy as np

from hummingbird_fungi.errors import ConfigError, DataError

TEMP_MARK = ".tmp-"  # temporary files are named .<target name>.tmp-<random><target suffix>
NAME_MAX = 255  # bytes in one path component on common file systems


@contextmanager
def atomic_write(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary handle on a fresh temporary file beside `path`, fsynced and renamed over `path` when the
    block ends without error (removed on error)."""
    path = Path(path)
    try:
        tmp, handle = _create_temp(path)
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with handle:
            yield handle
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; a partial file after an error


def _create_temp(path: Path) -> tuple[Path, IO[bytes]]:
    """A new, exclusively created temporary file beside `path` (permissions from the umask) and its handle."""
    while True:
        tmp = path.with_name(f".{path.name}{TEMP_MARK}{secrets.token_hex(4)}{path.suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        return tmp, os.fdopen(fd, "wb")


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes to `path` through a temporary file in the same folder and a rename."""
    with atomic_write(path) as handle:
        handle.write(data)


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    """np.save (the same bytes) through a temporary file and a rename."""
    with atomic_write(path) as handle:
        np.save(handle, array)


def save_npz_atomic(path: str | Path, **arrays: np.ndarray) -> None:
    """np.savez_compressed of named arrays through a temporary file and a rename."""
    with atomic_write(path) as handle:
        np.savez_compressed(handle, **arrays)


def remove_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in `folder` (only safe while holding its lock)."""
    stale = [p for p in folder.glob(f".*{TEMP_MARK}*") if p.is_file()]
    for file in stale:
        file.unlink(missing_ok=True)
    return stale


def save_image(path: Path, image: Any, format: str = "PNG", **params: Any) -> None:
    """Encode a PIL image (`params`: encoder options, e.g. quality) and write it atomically (a planted symlink
    is replaced, never followed)."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    write_atomic(path, buffer.getvalue())


def json_safe(value: Any, options: str | None = None) -> Any:
    """`value` with paths, tuples and numpy scalars as JSON types and non-finite floats as None (an undefined
    metric); with `options` (the dotted name of a recorded configuration) a non-finite float is a ConfigError."""
    if isinstance(value, dict):
        return {str(k): json_safe(v, options and f"{options}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, options and f"{options}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        if options:
            raise ConfigError(f"{options}={value!r}: a setting the run used is never written as null "
                              f"(configurations hold finite numbers only)")
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


RECORDED_OPTIONS = ("config", "segmenter")  # the keys of results that record what a run was configured with


def write_json(path: str | Path, results: dict) -> Path:
    """Write `results` as strict JSON, atomically; parent folders are created. Undefined metrics (NaN) are
    written as null; a non-finite number among the recorded settings (`RECORDED_OPTIONS`) is refused."""
    path = Path(path)
    document = {str(key): json_safe(value, str(key) if key in RECORDED_OPTIONS else None)
                for key, value in results.items()}
    make_dirs(path.parent)
    write_atomic(path, (json.dumps(document, indent=2, allow_nan=False) + "\n").encode())
    return path


def make_dirs(folder: str | Path, inside: str | Path | None = None) -> Path:
    """Create `folder` and its parents (a DataError naming it when that fails). With `inside`, an output folder
    above `folder`: a symbolic link at `folder` or between it and `inside` is refused, never written through."""
    folder = Path(folder)
    if inside is not None:
        part = Path(inside)
        for name in folder.relative_to(inside).parts:
            part = part / name
            if part.is_symlink():
                raise DataError(f"cannot create folder {folder}: {part} is a symbolic link, and outputs are never "
                                f"written through a link; remove it or choose another output folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create folder {folder}: {exc.strerror or exc}") from exc
    return folder


# --------------------------------------------------------------------------- checks made before any work


def _check_name(path: Path, what: str) -> None:
    """Refuse a path the file system cannot hold (a NUL byte, a component over NAME_MAX bytes)."""
    if "\0" in str(path):
        raise ConfigError(f"{what} {str(path)!r} contains a NUL byte")
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise ConfigError(f"{what} {path}: the name {part[:40]}... is longer than {NAME_MAX} bytes")


def _check_parent(path: Path, what: str) -> None:
    """The nearest existing ancestor of `path` must be a writable directory."""
    parent = path.absolute().parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: folder {parent} is not writable")


def check_output_file(path: str | Path | None, what: str) -> None:
    """Refuse a file output that is a directory, lies under a file, or sits in a folder we cannot write."""
    if path is None:
        return
    path = Path(path)
    _check_name(path, what)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory; give a file name, e.g. {path / 'results.json'}")
    _check_parent(path, what)


def check_output_dir(path: str | Path | None, what: str) -> None:
    """Refuse a folder output that is a file (or a symlink to nowhere) or cannot be created and written."""
    if path is None:
        return
    path = Path(path)
    _check_name(path, what)
    if path.exists() and not path.is_dir() or path.is_symlink() and not path.exists():
        raise ConfigError(f"{what} {path} exists and is not a directory")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} {path} is not writable")
        return
    _check_parent(path, what)


def check_input(path: str | Path | None, what: str, kind: str = "dir") -> None:
    """Refuse a missing input: `kind` 'dir' (a folder) or 'file'."""
    if path is None:
        return
    path = Path(path)
    _check_name(path, what)
    if not (path.is_dir() if kind == "dir" else path.is_file()):
        raise DataError(f"{what} {path} does not exist or is not a {'directory' if kind == 'dir' else 'file'}")


def check_no_overlap(outputs: Mapping[str, str | Path | None], inputs: Mapping[str, str | Path | None]) -> None:
    """Refuse an output that is, lies inside or contains an input (symlinks resolved), before anything is written.

    Keys name the paths in the message (e.g. '--out', '--ground-truth').
    """
    for out_name, out in outputs.items():
        if out is None:
            continue
        target = Path(out).resolve()
        for in_name, source in inputs.items():
            if source is None:
                continue
            origin = Path(source).resolve()
            relation = ("is" if target == origin else "lies inside" if target.is_relative_to(origin)
                        else "contains" if origin.is_relative_to(target) else None)
            if relation:
                link = f" (which resolves to {target})" if target != Path(out).absolute() else ""
                raise ConfigError(f"refusing to write: {out_name} {out}{link} {relation} {in_name} {source}; "
                                  f"outputs would overwrite inputs, choose another location")


def preflight(inputs: Mapping[str, tuple[str | Path | None, str]],
              outputs: Mapping[str, tuple[str | Path | None, str]]) -> dict[str, Path]:
    """Check paths before any model loads; {name: (path, kind)} with None paths skipped.

    Inputs must exist as their kind ('dir' or 'file'; a root inside a tar archive, 'x.tar!/folder', stands for
    the archive file), outputs must be writable as theirs ('dir' or 'file'), and no output may be, lie inside
    or contain an input. Returns the checked input paths by name (archives for tar roots).
    """
    from hummingbird_fungi.data.archives import TarPath, as_path

    checked: dict[str, Path] = {}
    for name, (path, kind) in inputs.items():
        if path is None:
            continue
        root = as_path(path) if kind == "dir" else Path(path)
        if isinstance(root, TarPath):  # the archive is the input
            root, kind = root.archive, "file"
        check_input(root, name, kind)
        checked[name] = Path(root)
    for name, (path, kind) in outputs.items():
        (check_output_file if kind == "file" else check_output_dir)(path, name)
    check_no_overlap({name: path for name, (path, _) in outputs.items()}, checked)
    return checked

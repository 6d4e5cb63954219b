"""YAML presets with dotted `key=value` overrides, turned into a validated, typed configuration."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hummingbird_fungi.config.schema import HbirdConfig
from hummingbird_fungi.config.typed import Section
from hummingbird_fungi.errors import ConfigError

C = TypeVar("C", bound=Section)


def deep_merge(base: dict, update: dict) -> dict:
    """`base` updated recursively by `update` (mappings merge, other values replace)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (['a','b','c'], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse value: {exc}") from exc
    return key.split("."), value


def nest(keys: list[str], value: Any) -> dict:
    """Turn (['a','b'], v) into {'a': {'b': v}}."""
    out: Any = value
    for key in reversed(keys):
        out = {key: out}
    return out


def overrides_to_dict(overrides: list[str] | None) -> dict:
    """Dotted `key=value` overrides -> one nested dict (later ones win)."""
    out: dict = {}
    for text in overrides or []:
        out = deep_merge(out, nest(*parse_override(text)))
    return out


PACKAGE = Path(__file__).resolve().parents[1]


def preset_folder() -> Path:
    """The presets: inside the package when installed from a wheel (pyproject.toml maps them there), else the
    checkout's top-level `configs/` (a plain checkout or an editable install)."""
    shipped = PACKAGE / "configs"
    return shipped if shipped.is_dir() else PACKAGE.parent / "configs"


def presets() -> dict[str, Path]:
    """The shipped presets by name (file stem)."""
    return {path.stem: path for path in sorted(preset_folder().glob("*.yaml"))}


def preset_description(path: Path) -> str:
    """The first comment line of a preset file (what it is for)."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def resolve_preset(name: str | Path) -> Path:
    """A preset file: an existing path, else a shipped preset by name (with or without .yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = presets().get(path.name.removesuffix(".yaml")) if path.parent == Path(".") else None
    if shipped is not None:
        return shipped
    close = difflib.get_close_matches(path.stem, list(presets()), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"config {name} is neither a file nor a shipped preset{hint}; "
                      f"`hbfungi configs` lists the presets")


def read_preset(path: str | Path) -> dict:
    """The mapping of a YAML preset (a file or a shipped preset's name), with errors naming the file."""
    path = resolve_preset(path)
    try:
        preset = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse config file {path}: {exc}") from exc
    if not isinstance(preset, dict):
        raise ConfigError(f"config file {path} must hold a mapping")
    return preset


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                schema: type[C] = HbirdConfig) -> C:  # type: ignore[assignment]
    """The schema's defaults, then the YAML preset at `path`, then each dotted override; checked."""
    given = read_preset(path) if path is not None else {}
    return schema.from_mapping(deep_merge(given, overrides_to_dict(overrides)))

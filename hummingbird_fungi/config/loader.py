"""YAML presets with dotted `key=value` overrides, checked against the known keys."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

from hummingbird_fungi.errors import ConfigError

# Keys whose values are free-form dicts passed to a component (validated there).
FREE_FORM = {"features.fungi", "retrieval.options", "knn", "features.image"}

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "auto",
    "model": {"name": "dino_vits16", "weights": None, "pretrained": True, "input_size": [512, 512]},
    "data": {
        "kind": "voc",
        "root": None,
        "train_split": "trainaug",
        "eval_split": "val",
        "train_file_set": None,
        "eval_file_set": None,
        "max_train_images": None,
        "max_eval_images": None,
        "normalize": "reference",
        "eval_resolution": "input",
        "batch_size": 4,
        "num_workers": 2,
    },
    "features": {
        "kind": "embeddings",
        "fungi": {},
        "support": {"size": 102400, "augmentation_epochs": 1},
    },
    "memory": {
        "size": 102400,
        "augmentation_epochs": 1,
        "augment": True,
        "sampling": "label_aware",
        "void": "auto",
        "dtype": "float16",
        "label_dtype": "float16",
        "shard_images": 256,
        "path": None,
    },
    "retrieval": {"backend": "torch", "k": 30, "options": {}},
    "transfer": {"temperature": 0.02, "rescore": True, "rerank": 0, "class_chunk": 32},
}


def deep_merge(base: dict, update: dict, prefix: str = "", strict: bool = True) -> dict:
    """Return `base` updated recursively by `update`; unknown keys raise ConfigError if strict."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{prefix}{key}"
        if strict and key not in out:
            close = difflib.get_close_matches(key, list(out), n=3)
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint}")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value, prefix=path + ".", strict=strict and path not in FREE_FORM)
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                defaults: dict | None = None) -> dict:
    """Defaults, then the YAML preset at `path`, then each dotted override, validated."""
    config = copy.deepcopy(DEFAULTS if defaults is None else defaults)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            preset = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse config file {path}: {exc}") from exc
        if not isinstance(preset, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
        config = deep_merge(config, preset)
    for text in overrides or []:
        keys, value = parse_override(text)
        config = deep_merge(config, nest(keys, value))
    return config


def input_size(value: Any) -> tuple[int, int]:
    """Normalise `model.input_size` (int, [H, W] or 'WxH' string) to (H, W)."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, str) and "x" in value:
        width, height = value.lower().split("x", 1)
        return int(height), int(width)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ConfigError(f"model.input_size must be an int, [H, W] or 'WxH', got {value!r}")

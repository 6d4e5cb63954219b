"""Typed option sections: dataclasses whose fields are checked for type and range when built.

A section is a dataclass deriving from `Section`. Each field's type hint says what it accepts
(int, float, bool, str, `X | None`, `Literal[...]`, `tuple[...]`, `list[...]`, `dict`, a nested
section) and `option(...)` adds a range check, a parser and a one-line description. Values are
checked in `__post_init__`, so a section built from Python is checked like one built from YAML;
`from_mapping` builds a section from nested dicts and refuses unknown keys with suggestions.
Numbers are finite (NaN and +-infinity are refused for every field) and a section is never null.
Errors are `ConfigError`s naming the dotted key and the value. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Callable, ClassVar, Literal, Mapping, TypeVar, Union

from hummingbird_fungi.errors import ConfigError

S = TypeVar("S", bound="Section")
Check = Callable[[Any], str | None]  # returns what is wrong, or None


def option(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
           check: Check | None = None, parse: Callable[[Any], Any] | None = None, doc: str = "") -> Any:
    """A section field with a default, an optional range check and parser, and a description."""
    metadata = {"check": check, "parse": parse, "doc": doc}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def with_overrides(cls: type[S], options: S | None, overrides: Mapping[str, Any]) -> S:
    """`options` (default: the defaults of `cls`) with `overrides` applied, checked; unknown names refused."""
    base = cls() if options is None else options
    if not isinstance(base, cls):
        raise ConfigError(f"expected {cls.__name__}, got {type(base).__name__}")
    return cls.from_mapping(dict(overrides), base=base) if overrides else base


def _numbers(value: Any) -> list[int | float]:
    """The numbers of a value, or of each item of a tuple or list (strings such as 'full' skipped)."""
    values = value if isinstance(value, (tuple, list)) else [value]
    return [v for v in values if isinstance(v, (int, float))]


def finite(value: Any) -> str | None:
    """A check that numbers (and each number of a tuple or list) are finite: not NaN, not +-infinity."""
    return "must be a finite number" if any(not math.isfinite(v) for v in _numbers(value)) else None


def at_least(low: float) -> Check:
    """A check that numbers (and each number of a tuple or list) are finite and >= low."""
    def check(value: Any) -> str | None:
        return finite(value) or (f"must be >= {low}" if any(not v >= low for v in _numbers(value)) else None)
    return check


def positive(value: Any) -> str | None:
    """A check that numbers (and each number of a tuple or list) are finite and > 0."""
    return finite(value) or ("must be > 0" if any(not v > 0 for v in _numbers(value)) else None)


def in_unit_interval(value: Any) -> str | None:
    """A check for a probability in (0, 1] (NaN fails the comparison, so it is refused)."""
    return None if value is None or 0 < value <= 1 else "must be in (0, 1]"


class Section:
    """Base of typed option sections (subclasses are dataclasses); `key` names the section in messages."""

    key: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            name = f"{self.key}.{field.name}" if self.key else field.name
            value = getattr(self, field.name)
            parse = field.metadata.get("parse")
            if parse is not None and value is not None:
                value = _call(parse, value, name)
            value = coerce(value, _hints(type(self))[field.name], name)
            check = field.metadata.get("check")
            problem = check(value) if check is not None and value is not None else None
            if problem:
                raise ConfigError(f"{name}={value!r}: {problem}")
            setattr(self, field.name, value)
        self.validate()

    def validate(self) -> None:
        """Checks across fields (override); raise ConfigError naming the keys."""

    @classmethod
    def from_mapping(cls: type[S], data: Mapping[str, Any] | None, key: str | None = None,
                     base: S | None = None) -> S:
        """Build the section from a (nested) mapping of given values over `base` (default: the defaults)."""
        key = cls.key if key is None else key
        data = {} if data is None else data
        if not isinstance(data, Mapping):
            raise ConfigError(f"{key or 'config'} must be a mapping of keys to values, got {data!r}")
        base = cls() if base is None else base
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        kwargs = {name: getattr(base, name) for name in fields}
        for name, value in data.items():
            path = f"{key}.{name}" if key else str(name)
            if name not in fields:
                close = difflib.get_close_matches(str(name), list(fields), n=3)
                hint = f" (did you mean {', '.join(f'{key}.{c}' if key else c for c in close)}?)" if close else ""
                raise ConfigError(f"unknown config key {path!r}{hint}")
            nested = kwargs[name]
            if isinstance(nested, Section) and isinstance(value, Mapping):  # None or a scalar: refused by coerce
                value = type(nested).from_mapping(value, path, base=nested)
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists) for JSON results and manifests."""
        return _plain(dataclasses.asdict(self))  # type: ignore[call-overload]

    def describe(self, prefix: str = "") -> list[tuple[str, Any, str]]:
        """(dotted key, value, description) of every field, nested sections expanded."""
        rows = []
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if isinstance(value, Section):
                rows += value.describe(f"{prefix}{field.name}.")
            else:
                rows.append((f"{prefix}{field.name}", _plain(value), field.metadata.get("doc", "")))
        return rows


# --------------------------------------------------------------------------- coercion


def coerce(value: Any, hint: Any, name: str) -> Any:
    """`value` checked (and converted where lossless: int -> float, list -> tuple) against a type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name}={value!r}: {finite(value)}")
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, name)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{name}={value!r}: expected {_describe(hint)}")
    if origin is Literal:
        if value in args and type(value) is type(next(a for a in args if a == value)):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint_text = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{name}={value!r}: choose one of {', '.join(repr(a) for a in args)}{hint_text}")
    if isinstance(hint, type) and issubclass(hint, Section):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return hint.from_mapping(value, name)
        if value is None:
            first = dataclasses.fields(hint)[0].name
            raise ConfigError(f"{name}=null: a section cannot be null; set its keys, e.g. {name}.{first}=...")
        raise ConfigError(f"{name}={value!r}: expected a mapping of {hint.__name__} options")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise ConfigError(f"{name}={value!r}: expected {_describe(hint)}")
        items = args if args[-1] is not Ellipsis else (args[0],) * len(value)
        return tuple(coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, items)))
    if origin is list:
        values = value if isinstance(value, (list, tuple)) else [value]  # a scalar stands for a one-item list
        return [coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(values)] if args else list(values)
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}={value!r}: expected a mapping")
        return {key: coerce(item, args[1] if args else Any, f"{name}.{key}") for key, item in value.items()}
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint in (bool, str):
        if isinstance(value, hint):
            return value
    else:
        raise TypeError(f"unsupported option type {hint!r} for {name}")
    raise ConfigError(f"{name}={value!r}: expected {_describe(hint)}, got {type(value).__name__}")


def _describe(hint: Any) -> str:
    """Human words for a type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} values" if args[-1] is not Ellipsis else "a list"
    if origin is list:
        return f"a list of {_describe(args[0])}" if args else "a list"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a section class (cached on the class)."""
    cached = cls.__dict__.get("_resolved_hints")
    if cached is None:
        cached = typing.get_type_hints(cls)
        setattr(cls, "_resolved_hints", cached)
    return cached


def _call(parse: Callable[[Any], Any], value: Any, name: str) -> Any:
    """Run a field parser; its ValueError/TypeError becomes a ConfigError naming the key."""
    try:
        return parse(value)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{name}={value!r}: {error}") from error


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively (JSON-friendly)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value

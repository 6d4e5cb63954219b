"""One small registry of named factories (feature kinds, datasets, indexes, projections, objectives)."""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Generic, TypeVar

from hummingbird_fungi.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Factories by name; `get` refuses an unknown name with the valid ones and a suggestion."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._factories: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that adds a factory under `name` (and returns it unchanged)."""
        def add(factory: T) -> T:
            self._factories[name] = factory
            return factory
        return add

    def unregister(self, name: str) -> None:
        """Remove the factory registered under `name` (KeyError if there is none)."""
        del self._factories[name]

    def check(self, name: str) -> str | None:
        """What is wrong with `name` (unknown: a suggestion and the valid names), or None when it is registered."""
        if name in self._factories:
            return None
        close = difflib.get_close_matches(str(name), list(self._factories), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.what} {name!r}{hint}; choose one of {', '.join(self.names())}"

    def get(self, name: str) -> T:
        """The factory registered under `name`; ConfigError naming the valid names otherwise."""
        problem = self.check(name)
        if problem:
            raise ConfigError(problem)
        return self._factories[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories


def find_registry(where: str) -> Registry[Any]:
    """The Registry at `where` ('package.module:NAME'), importing the module that fills it (at run time, so that
    config/ can name registries of the layers above it without importing them)."""
    module, _, name = where.partition(":")
    return getattr(importlib.import_module(module), name)

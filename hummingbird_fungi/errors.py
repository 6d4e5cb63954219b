"""Exceptions raised for bad user input, each naming the offending file or value."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator


class DataError(ValueError):
    """A data file or folder is missing, unreadable or inconsistent."""


class ConfigError(ValueError):
    """A configuration key or value is invalid."""


class BankMismatchError(ValueError):
    """A memory bank was built with a different backbone or feature configuration."""


USER_ERRORS = (DataError, ConfigError, BankMismatchError)
_WORKER = re.compile(r"\ACaught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


@contextmanager
def worker_errors_unwrapped() -> Iterator[None]:
    """Re-raise a user error from a DataLoader worker with its own message, not the worker's traceback."""
    try:
        yield
    except USER_ERRORS as exc:
        text = str(exc)
        if _WORKER.match(text) is None:
            raise
        kind = type(exc)
        _, marker, message = text.rpartition(f"{kind.__module__}.{kind.__qualname__}: ")
        raise kind(message.strip() if marker else text) from None

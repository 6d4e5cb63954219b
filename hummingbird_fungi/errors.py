"""Exceptions raised for bad user input, each naming the offending file or value."""


class DataError(ValueError):
    """A data file or folder is missing, unreadable or inconsistent."""


class ConfigError(ValueError):
    """A configuration key or value is invalid."""


class BankMismatchError(ValueError):
    """A memory bank was built with a different backbone or feature configuration."""

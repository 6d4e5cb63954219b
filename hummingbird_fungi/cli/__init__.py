"""The `hbfungi` command line: thin sub-commands that parse options and call the package's API."""

from hummingbird_fungi.cli.main import main

__all__ = ["main"]

"""Markers for the optional packages of the dev extras: each skips only the tests that need its package.

A module-level `pytest.importorskip` skips every test of a file (and of every file importing it); these
markers go on the single tests (or `pytest.param` cases) that use the package, so an install without the
extras still runs everything else. The check imports the module (not `find_spec`), so a broken install or a
module blocked with `sys.modules[name] = None` counts as missing too.
"""

from __future__ import annotations

import importlib

import pytest


def importable(name: str) -> bool:
    """Whether `import name` succeeds."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


HAS_FAISS = importable("faiss")
HAS_PYCOCOTOOLS = importable("pycocotools.mask")

requires_faiss = pytest.mark.skipif(not HAS_FAISS, reason="needs faiss (pip install 'hummingbird-fungi[faiss]')")
requires_pycocotools = pytest.mark.skipif(not HAS_PYCOCOTOOLS,
                                          reason="needs pycocotools (pip install 'hummingbird-fungi[coco]')")

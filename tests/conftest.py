"""Shared fixtures: small generated folder datasets in the ADE20K-style layout."""

from pathlib import Path

import pytest

from hummingbird_fungi.testing import make_folder_dataset


@pytest.fixture
def toy_dataset(tmp_path) -> Path:
    """A generated 3-class folder dataset (6 train, 3 val images of 64x64)."""
    return make_folder_dataset(tmp_path / "toy")

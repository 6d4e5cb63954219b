"""Shared fixtures: small generated folder datasets in the ADE20K-style layout."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("sky", "road", "car")
VOID = 3


def make_scene(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A toy street scene: sky above, road below, a red car box, void pixels on a line."""
    h, w = size
    horizon = int(rng.integers(h // 3, 2 * h // 3))
    mask = np.zeros((h, w), np.uint8)
    mask[horizon:] = 1
    top, left = int(rng.integers(horizon - 8, h - 12)), int(rng.integers(0, w - 20))
    mask[top:top + 12, left:left + 20] = 2
    colours = np.array([[90, 140, 230], [110, 110, 110], [200, 30, 30]], np.float32)
    image = colours[mask] + rng.normal(0, 12, (h, w, 3))
    mask[horizon, :] = VOID
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_folder_dataset(root: Path, n_train: int = 6, n_val: int = 3, size=(64, 64), seed: int = 0) -> Path:
    """Write images/<split>, annotations/<split> and dataset.yaml under `root`."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = make_scene(rng, size)
            Image.fromarray(image).save(root / "images" / split / f"{split}{i:03d}.png")
            Image.fromarray(mask).save(root / "annotations" / split / f"{split}{i:03d}.png")
    (root / "dataset.yaml").write_text(
        f"name: toy\nnum_classes: 3\nignore_index: {VOID}\nclasses: [{', '.join(CLASSES)}]\n")
    return root


@pytest.fixture
def toy_dataset(tmp_path) -> Path:
    """A generated 3-class folder dataset (6 train, 3 val images of 64x64)."""
    return make_folder_dataset(tmp_path / "toy")

"""Palette, overlays, grid and plots; the demo scenes and how the demo picks its inputs."""

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hummingbird_fungi.segment.demo_data import CLASS_NAMES, make_scene, write_demo_data
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.cli.segment import demo_sources
from hummingbird_fungi.segment.visualize import (VOID_COLOUR, colorize, overlay, overlay_grid, palette, plot_miou_vs_memory,
                                         plot_per_class_iou)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    """Whether the file exists and starts with the PNG signature."""
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_palette_is_voc_and_distinct():
    colours = palette(300)
    assert colours[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert len({tuple(c) for c in colours}) == 300


def test_colorize_marks_void_and_overlay_keeps_size():
    mask = np.array([[0, 1], [2, 255]])
    colours = colorize(mask, 3)
    assert colours.shape == (2, 2, 3) and tuple(colours[1, 1]) == VOID_COLOUR
    image = np.full((2, 2, 3), 100, np.uint8)
    assert overlay(Image.fromarray(image), mask, 3).shape == (2, 2, 3)
    with pytest.raises(ValueError):
        overlay(image, np.zeros((3, 2), int), 3)


def test_grid_and_plots_write_pngs(tmp_path):
    scenes = [make_scene(i, size) for i, size in enumerate([(40, 60), (61, 37)])]
    rows = [{"image": scenes[0].image, "pred": scenes[0].mask, "gt": scenes[0].mask, "name": "a"},
            {"image": Image.fromarray(scenes[1].image), "pred": scenes[1].mask, "gt": None}]
    assert is_png(overlay_grid(rows, tmp_path / "grid.png", CLASS_NAMES, title="t"))
    assert is_png(plot_per_class_iou({"sky": 0.9, "car": None, "sign": 0.0}, tmp_path / "iou.png"))
    series = {"embeddings": [(100, 0.3), (1000, 0.45)], "fungi": [(100, 0.35), (1000, 0.5)]}
    assert is_png(plot_miou_vs_memory(series, tmp_path / "sweep.png"))


def test_demo_data_is_deterministic_and_complete(tmp_path):
    first = write_demo_data(tmp_path / "a", num_examples=3, num_queries=2, seed=5)
    second = write_demo_data(tmp_path / "b", num_examples=3, num_queries=2, seed=5)
    for name in ("examples/images/example_00.png", "examples/masks/example_02.png", "images/scene_01.jpg",
                 "ground_truth/scene_00.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (first["examples"] / "dataset.yaml").is_file() and second["images"].is_dir()
    ids = np.concatenate([make_scene(i, (240, 320)).mask.ravel() for i in range(8)])
    assert set(np.unique(ids)) == set(range(len(CLASS_NAMES)))


def test_demo_sources_flags_then_environment(monkeypatch):
    blank = argparse.Namespace(backbone=None, weights=None, examples=None, images=None)
    assert demo_sources(blank) == {"backbone": None, "weights": None, "examples": None, "images": None}
    monkeypatch.setenv("HBFUNGI_BACKBONE", "dinov2_vits14")
    monkeypatch.setenv("HBFUNGI_WEIGHTS", "w.pth")
    got = demo_sources(argparse.Namespace(backbone="dino_vits16", weights=None, examples=None, images=None))
    assert got["backbone"] == "dino_vits16" and got["weights"] == Path("w.pth")
    monkeypatch.setenv("HBFUNGI_EXAMPLES", "ex")
    with pytest.raises(ConfigError):
        demo_sources(blank)

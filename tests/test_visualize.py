"""Palette, overlays, grid and plots; the demo scenes and how the demo picks its inputs."""

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hummingbird_fungi.segment.demo_data import CLASS_NAMES, make_scene, write_demo_data
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.cli.segment import demo_sources
from hummingbird_fungi.segment.visualize import (DISTINCT, VOID_COLOUR, colorize, mask_image, overlay, overlay_grid,
                                                 overlay_with_legend, palette, plot_miou_vs_memory,
                                         plot_per_class_iou)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    """Whether the file exists and starts with the PNG signature."""
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_palette_keeps_classes_apart_and_takes_a_dataset_palette():
    colours = palette(300)
    assert len({tuple(c) for c in colours}) == 300
    assert colours[:20].tolist() == [list(c) for c in DISTINCT]
    first = colours[:20].astype(int)  # CamVid's sky (0) and car (8), VOC's first 20: never near-black
    assert first.sum(1).min() > 120
    gaps = np.abs(first[:, None] - first[None]).sum(-1) + np.eye(20, dtype=int) * 999
    assert gaps[:12, :12].min() >= 50 and gaps.min() >= 30  # summed RGB levels between any two colours
    own = palette(3, [[1, 2, 3], [4, 5, 6]])
    assert own[:2].tolist() == [[1, 2, 3], [4, 5, 6]] and own[2].tolist() == list(DISTINCT[0])


def test_mask_png_keeps_ids_and_shows_colours(tmp_path):
    mask = np.array([[0, 1, 2], [8, 10, 255]], dtype=np.uint8)
    mask_image(mask, palette(11)).save(tmp_path / "m.png")
    loaded = Image.open(tmp_path / "m.png")
    assert loaded.mode == "P" and np.array_equal(np.array(loaded), mask)
    assert tuple(loaded.convert("RGB").getpixel((1, 1))) == DISTINCT[10]
    assert tuple(loaded.convert("RGB").getpixel((2, 1))) == (255, 255, 255)  # void shows white
    wide = np.array([[0, 300]], dtype=np.uint16)
    mask_image(wide, palette(301)).save(tmp_path / "w.png")
    assert np.array_equal(np.array(Image.open(tmp_path / "w.png")), wide)


def test_overlay_has_a_legend_of_the_classes_present():
    mask = np.zeros((40, 120), np.int64)
    mask[:, 60:] = 2
    names = ["sky", "building", "car"]
    out = overlay_with_legend(np.full((40, 120, 3), 128, np.uint8), mask, names)
    assert out.shape[1] == 120 and out.shape[0] > 40  # a strip below the image
    strip = out[40:].reshape(-1, 3)
    colours = {tuple(c) for c in strip.tolist()}
    assert DISTINCT[0] in colours and DISTINCT[2] in colours and DISTINCT[1] not in colours  # swatches of 0 and 2
    assert (strip.sum(1) < 100).sum() > 20  # dark text pixels (the names)


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

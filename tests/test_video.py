"""`hbfungi video` on generated frames: a red square moving over a textured background, first frame annotated."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hummingbird_fungi.cli.main import main

FRAMES, SIZE, SIDE, STEP = 8, 64, 20, 3
# a randomly initialised tiny ViT at patch 8, as the demo uses, on frames upsampled to 128x128 (a 16x16 grid,
# one patch = 4x4 frame pixels): its patch features are a random map of the pixels, so the red square's
# patches lie far from the grey texture's and retrieval from the first frame finds them. Errors come from
# patches cut by the square's edge: one wrong 4-px band along one 20-px edge costs 80 of ~400-480 pixels,
# IoU ~0.8. Measured: J 0.88-0.97 per frame, with and without propagation (0.71-0.76 at 64x64, where a
# band is 8 px). BOUND = 0.75 asks that at most about one edge band per frame be wrong.
MODEL = ["--backbone", "vit_tiny_patch16_224", "--random-init", "--backbone-option", "patch_size=8",
         "--backbone-option", "depth=4", "--input-size", "128x128", "--device", "cpu", "--k", "10"]
BOUND = 0.75


def square_mask(frame: int) -> np.ndarray:
    """(64, 64) uint8: 1 inside the square of `frame`, 0 elsewhere."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    top, left = 10 + STEP * frame // 2, 6 + STEP * frame
    mask[top:top + SIDE, left:left + SIDE] = 1
    return mask


def write_clip(root: Path, annotated: int = 1) -> tuple[Path, Path]:
    """frames/<i>.png and masks/<i>.png (the first `annotated` frames); the texture is fixed, the square moves."""
    rng = np.random.default_rng(0)
    texture = rng.integers(60, 160, (SIZE, SIZE, 1)).repeat(3, axis=2).astype(np.uint8)  # grey noise
    frames, masks = root / "frames", root / "masks"
    frames.mkdir(parents=True)
    masks.mkdir()
    for i in range(FRAMES):
        image = texture.copy()
        image[square_mask(i) == 1] = (200, 30, 40)
        Image.fromarray(image).save(frames / f"{i:05d}.png")
        if i < annotated:
            Image.fromarray(square_mask(i)).save(masks / f"{i:05d}.png")
    return frames, masks


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Foreground IoU of two 0/1 masks."""
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("propagation", [[], ["--propagate", "3", "--radius", "2"]], ids=["bank", "propagate"])
def test_video_recovers_the_moving_square(tmp_path, propagation, capsys):
    frames, masks = write_clip(tmp_path)
    out = tmp_path / "out"
    assert main(["video", "--frames", str(frames), "--masks", str(masks), "--out", str(out), *MODEL,
                 *propagation]) == 0
    scores = []
    for i in range(FRAMES):
        written = Image.open(out / "masks" / f"{i:05d}.png")
        assert written.mode == "P" and written.size == (SIZE, SIZE)
        assert (out / "overlays" / f"{i:05d}.png").is_file()
        if i:
            scores.append(iou(np.asarray(written) != 0, square_mask(i) == 1))
    assert min(scores) > BOUND, scores
    summary = json.loads((out / "summary.json").read_text())
    assert summary["annotated"] == ["00000"] and summary["video"]["num_scored"] == 0
    # the strip: frames round(linspace(0, 7, 6)), 64 px each (under STRIP_SIDE, kept), 4-px white gaps
    assert summary["video"]["strip_frames"] == ["00000", "00001", "00003", "00004", "00006", "00007"]
    strip = np.asarray(Image.open(out / summary["video"]["strip"]))
    assert strip.shape == (SIZE, 6 * SIZE + 5 * 4, 3) and (strip[:, SIZE:SIZE + 4] == 255).all()
    assert "mean J" not in capsys.readouterr().out


def test_summary_scores_the_masks_not_in_memory(tmp_path):
    frames, masks = write_clip(tmp_path, annotated=FRAMES)
    out = tmp_path / "out"
    assert main(["video", "--frames", str(frames), "--masks", str(masks), "--out", str(out), "--annotate", "first",
                 "--propagate", "2", *MODEL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = summary["video"]["frames"]
    assert [r["annotated"] for r in records] == [True] + [False] * (FRAMES - 1)
    expected = [iou(np.asarray(Image.open(out / "masks" / f"{i:05d}.png")) != 0, square_mask(i) == 1)
                for i in range(1, FRAMES)]
    assert [r["j"] for r in records[1:]] == pytest.approx(expected)
    assert summary["j_mean"] == pytest.approx(np.mean(expected)) and summary["j_mean"] > BOUND


def test_missing_first_mask_is_named(tmp_path, capsys):
    frames, masks = write_clip(tmp_path)
    (masks / "00000.png").rename(masks / "00001.png")
    assert main(["video", "--frames", str(frames), "--masks", str(masks), "--out", str(tmp_path / "out"),
                 *MODEL]) == 2
    err = capsys.readouterr().err
    assert "no mask for the first frame 00000.png" in err and str(masks / "00000.png") in err
    assert not (tmp_path / "out").exists()

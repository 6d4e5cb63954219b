"""`hbfungi video` on generated frames: a square moving over a textured background, first frame annotated;
propagation on a square whose colour drifts away from the annotated frame's; DAVIS J with void pixels."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hummingbird_fungi.cli.main import main
from hummingbird_fungi.eval.metrics import contour_accuracy, foreground_confusion, jaccard

FRAMES, SIZE, SIDE, STEP = 8, 64, 20, 3
# a randomly initialised tiny ViT at patch 8, as the demo uses, on frames upsampled to 128x128 (a 16x16 grid,
# one patch = 4x4 frame pixels): its patch features are a random map of the pixels, so the red square's
# patches lie far from the grey texture's and retrieval from the first frame finds them. Errors come from
# patches cut by the square's edge: one wrong 4-px band along one 20-px edge costs 80 of ~400-480 pixels,
# IoU ~0.8. Measured: J 0.88-0.97 per frame, with and without propagation (0.71-0.76 at 64x64, where a
# band is 8 px). BOUND = 0.75 asks that at most about one edge band per frame be wrong.
MODEL = ["--backbone", "vit_tiny_patch16_224", "--random-init", "--backbone-option", "patch_size=8",
         "--backbone-option", "depth=4", "--input-size", "128x128", "--device", "cpu", "--k", "10",
         "--features", "embeddings", "--no-whiten"]  # raw embeddings: the random net's pixel map, not a user default
BOUND = 0.75
RED, GREEN = np.array([200, 30, 40]), np.array([30, 200, 40])
VOID = 255


def square_mask(frame: int, void: bool = False) -> np.ndarray:
    """(64, 64) uint8: 1 inside the square of `frame`, 0 elsewhere; with `void`, the 2-pixel band across the
    square's edge (1 px inside, 1 px outside) is VOID, as DAVIS marks uncertain borders."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    top, left = 10 + STEP * frame // 2, 6 + STEP * frame
    if void:
        mask[top - 1:top + SIDE + 1, left - 1:left + SIDE + 1] = VOID
    mask[top + void:top + SIDE - void, left + void:left + SIDE - void] = 1
    return mask


def drifting(frame: int) -> np.ndarray:
    """The drifting square's colour at `frame`: red at the annotated frame, green at the last, linearly between."""
    t = frame / (FRAMES - 1)
    return np.round((1 - t) * RED + t * GREEN).astype(np.uint8)


def write_clip(root: Path, annotated: int = 1, colour=lambda frame: RED, void: bool = False) -> tuple[Path, Path]:
    """frames/<i>.png and masks/<i>.png (the first `annotated` frames); the texture is fixed, the square moves
    (in `colour(frame)`; masks with a void edge band if `void`)."""
    rng = np.random.default_rng(0)
    texture = rng.integers(60, 160, (SIZE, SIZE, 1)).repeat(3, axis=2).astype(np.uint8)  # grey noise
    frames, masks = root / "frames", root / "masks"
    frames.mkdir(parents=True)
    masks.mkdir()
    for i in range(FRAMES):
        image = texture.copy()
        image[square_mask(i) == 1] = colour(i)
        Image.fromarray(image).save(frames / f"{i:05d}.png")
        if i < annotated:
            Image.fromarray(square_mask(i, void)).save(masks / f"{i:05d}.png")
    return frames, masks


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Foreground IoU of two 0/1 masks."""
    return float((a & b).sum() / (a | b).sum())


def frame_scores(out: Path, frames=range(1, FRAMES)) -> list[float]:
    """IoU of each written mask of `frames` with the square."""
    return [iou(np.asarray(Image.open(out / "masks" / f"{i:05d}.png")) != 0, square_mask(i) == 1) for i in frames]


def test_video_recovers_the_moving_square(tmp_path, capsys):
    """The square keeps the annotated frame's colour: retrieval from the first frame alone finds it (propagation
    is tested where it is needed, below)."""
    frames, masks = write_clip(tmp_path)
    out = tmp_path / "out"
    assert main(["video", "--frames", str(frames), "--masks", str(masks), "--out", str(out), *MODEL]) == 0
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


def test_propagation_tracks_a_square_whose_colour_drifts(tmp_path):
    """The square turns from red (annotated) to green: after a few frames nothing in the first frame resembles it
    and retrieval from the bank alone loses it (J 0 measured on frames 4-7); the propagated predictions of the last
    frames, within 2 patches of each query, carry the label along (J 0.78-0.93 measured)."""
    frames, masks = write_clip(tmp_path, colour=drifting)
    bank, propagated = tmp_path / "bank", tmp_path / "propagated"
    assert main(["video", "--frames", str(frames), "--masks", str(masks), "--out", str(bank), *MODEL]) == 0
    assert main(["video", "--frames", str(frames), "--masks", str(masks), "--out", str(propagated), *MODEL,
                 "--propagate", "3", "--radius", "2"]) == 0
    assert max(frame_scores(bank, range(FRAMES - 3, FRAMES))) < 0.1  # the clip needs propagation
    scores = frame_scores(propagated)
    assert min(scores) > 0.7, scores


def test_summary_scores_the_masks_not_in_memory_without_their_void_pixels(tmp_path):
    """DAVIS J and F of each frame not in memory, against masks whose square edges are void: void pixels count
    neither as foreground nor as background (J) and are cleared before the boundaries are drawn (F)."""
    frames, masks = write_clip(tmp_path, annotated=FRAMES, void=True)
    out = tmp_path / "out"
    assert main(["video", "--frames", str(frames), "--masks", str(masks), "--out", str(out), "--annotate", "first",
                 "--propagate", "2", "--ignore-index", str(VOID), *MODEL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = summary["video"]["frames"]
    assert [r["annotated"] for r in records] == [True] + [False] * (FRAMES - 1)
    assert summary["protocol"] == "first" and summary["protocol_options"]["propagate"] == 2
    expected, with_void, contours = [], [], []
    for i in range(1, FRAMES):
        written, truth = np.asarray(Image.open(out / "masks" / f"{i:05d}.png")) != 0, square_mask(i, void=True)
        scored = truth != VOID
        expected.append(iou(written & scored, (truth == 1) & scored))
        with_void.append(iou(written, truth != 0))  # void taken for foreground, as `gt != 0` alone would
        contours.append(contour_accuracy(written & scored, (truth == 1) & scored))
    assert [r["j"]["1"] for r in records[1:]] == pytest.approx(expected)
    assert [r["f"]["1"] for r in records[1:]] == pytest.approx(contours)
    assert summary["j_mean"] == pytest.approx(np.mean(expected)) and summary["j_mean"] > BOUND
    assert summary["jf_mean"] == pytest.approx((np.mean(expected) + np.mean(contours)) / 2)
    assert summary["video"]["j_recall"] == np.mean(np.array(expected) > 0.5)
    assert any(abs(a - b) > 1e-3 for a, b in zip(expected, with_void))  # the void band changes J
    assert summary["video"]["frames_per_s"] > 0


def test_jaccard_by_hand_with_void_pixels_and_empty_masks():
    """DAVIS J: foreground = any id but 0; ground-truth void pixels are not counted whatever is predicted there;
    J = 1 when neither ground truth nor prediction has foreground (also when the ground truth is all void)."""
    gt = np.array([[0, 0, 1, 1],
                   [0, 255, 2, 1],
                   [255, 255, 0, 0]])
    pred = np.array([[0, 1, 1, 0],
                     [0, 1, 3, 1],
                     [0, 1, 0, 1]])
    # by hand (ground truth / prediction): bg/bg (0,0) (1,0) (2,2); bg/fg (0,1) (2,3); fg/bg (0,3);
    # fg/fg (0,2) (1,2) (1,3); the void pixels (1,1) (2,0) (2,1) are dropped
    confusion = foreground_confusion(pred, gt, 255)
    assert confusion.tolist() == [[3, 2], [1, 3]]
    assert jaccard(confusion) == pytest.approx(3 / (3 + 2 + 1))
    # without a void id, 255 is an object: (1,1) (2,1) fg/fg, (2,0) fg/bg
    assert foreground_confusion(pred, gt, None).tolist() == [[3, 2], [2, 5]]
    assert jaccard(foreground_confusion(pred * (gt != 255), np.where(gt == 255, 255, pred), 255)) == 1.0
    empty = np.zeros((2, 3), np.int64)
    assert jaccard(foreground_confusion(empty, empty, 255)) == 1.0  # empty / empty
    assert jaccard(foreground_confusion(empty, np.full((2, 3), 255), 255)) == 1.0  # all void, nothing predicted
    assert jaccard(foreground_confusion(np.ones((2, 3), np.int64), np.full((2, 3), 255), 255)) == 1.0  # all void
    assert jaccard(foreground_confusion(np.eye(2, 3, dtype=np.int64), empty, 255)) == 0.0  # false object
    assert jaccard(foreground_confusion(empty, np.eye(2, 3, dtype=np.int64), 255)) == 0.0  # missed object


def test_missing_first_mask_is_named(tmp_path, capsys):
    frames, masks = write_clip(tmp_path)
    (masks / "00000.png").rename(masks / "00001.png")
    assert main(["video", "--frames", str(frames), "--masks", str(masks), "--out", str(tmp_path / "out"),
                 *MODEL]) == 2
    err = capsys.readouterr().err
    assert "no mask for the first frame 00000.png" in err and str(masks / "00000.png") in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("problem", ["ground truth size", "zero-byte frame", "frame size"])
def test_bad_clip_inputs_are_refused_before_the_model_loads(tmp_path, problem, monkeypatch, capsys):
    """Every frame and mask header is read first: nothing is segmented or written when one is wrong."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the clip was checked")

    monkeypatch.setattr("hummingbird_fungi.segment.segmenter.create_encoder", refuse)
    frames, masks = write_clip(tmp_path, annotated=FRAMES)
    bad = {"ground truth size": masks / "00005.png", "zero-byte frame": frames / "00005.png",
           "frame size": frames / "00005.png"}[problem]
    if problem == "zero-byte frame":
        bad.write_bytes(b"")
    else:
        Image.open(bad).resize((SIZE, SIZE + 8)).save(bad)
    out = tmp_path / "out"
    assert main(["video", "--frames", str(frames), "--masks", str(masks), "--out", str(out), "--annotate", "first",
                 *MODEL]) == 2
    assert str(bad) in capsys.readouterr().err and not out.exists()


def test_a_frame_that_fails_while_segmenting_is_listed_and_the_clip_finishes(tmp_path, capsys):
    frames, masks = write_clip(tmp_path)
    broken = frames / "00004.png"
    broken.write_bytes(broken.read_bytes()[:len(broken.read_bytes()) // 2])  # header intact, pixels cut
    out = tmp_path / "out"
    assert main(["video", "--frames", str(frames), "--masks", str(masks), "--out", str(out), *MODEL]) == 2
    captured = capsys.readouterr()
    assert f"skipped {broken}" in captured.out and "1 of the 8 frames" in captured.err
    video = json.loads((out / "summary.json").read_text())["video"]
    assert [failure["file"] for failure in video["failed"]] == [str(broken)]
    assert video["num_segmented"] == FRAMES - 1 and len(video["frames"]) == FRAMES - 1
    assert sorted(p.stem for p in (out / "masks").iterdir()) == [f"{i:05d}" for i in range(FRAMES) if i != 4]


def test_whitening_fitted_on_the_clip(tmp_path, capsys):
    """`--whiten-on clip` fits the whitening on every frame's patches (8 frames x a 16x16 grid), not on the
    annotated frame's 256, and the square is still found; without whitening the flag is refused before the
    model loads."""
    frames, masks = write_clip(tmp_path)
    base = ["video", "--frames", str(frames), "--masks", str(masks), *MODEL, "--whiten-dims", "16"]
    runs = {}
    for where in ("examples", "clip"):
        out = tmp_path / where
        assert main([*base, "--out", str(out), "--whiten", "--whiten-on", where]) == 0
        runs[where] = json.loads((out / "summary.json").read_text())
        assert min(frame_scores(out)) > BOUND
    fitted = {where: run["segmenter"]["features"]["transform"]["fitted_rows"] for where, run in runs.items()}
    assert fitted == {"examples": 256, "clip": FRAMES * 256} and runs["clip"]["whiten_on"] == "clip"
    assert main([*base, "--out", str(tmp_path / "refused"), "--no-whiten", "--whiten-on", "clip"]) == 2
    assert "--whiten-on clip" in capsys.readouterr().err and not (tmp_path / "refused").exists()

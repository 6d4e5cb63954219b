"""DAVIS J and F by hand and against an independent implementation; DINO's label propagation of two moving
objects; DAVIS folders through `hbfungi video --davis` and `davis_evaluation`."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from references import boundary_reference, davis_f_reference

from hummingbird_fungi import davis_evaluation
from hummingbird_fungi.cli.main import main
from hummingbird_fungi.config.schema import FeatureOptions
from hummingbird_fungi.eval.metrics import (boundary_map, contour_accuracy, davis_frame, davis_statistics,
                                            region_similarity)
from hummingbird_fungi.memory.bank import MemoryBank
from hummingbird_fungi.retrieval.transfer import LabelTransfer
from hummingbird_fungi.segment.video import anchor_labels, video_protocol

SIZE, SIDE, STEP = 64, 16, 3
TINY = ["--backbone", "vit_tiny_patch16_224", "--random-init", "--backbone-option", "patch_size=8",
        "--backbone-option", "depth=4", "--device", "cpu"]
RED, BLUE, GREEN = np.array([200, 30, 40]), np.array([30, 40, 200]), np.array([30, 200, 40])


# --------------------------------------------------------------------------- J and F


def square(size: int, top: int, left: int, side: int) -> np.ndarray:
    """(size, size) bool square of `side` pixels at (top, left)."""
    mask = np.zeros((size, size), bool)
    mask[top:top + side, left:left + side] = True
    return mask


def test_boundary_map_by_hand():
    """A 2x2 object's boundary is drawn half a pixel towards the origin: the ring of the 3x3 square around it."""
    expected = np.array([[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]], bool)
    assert (boundary_map(square(4, 1, 1, 2)) == expected).all()
    assert not boundary_map(np.zeros((3, 5), bool)).any()


def test_j_and_f_by_hand_on_a_shifted_square():
    """A 6x6 square and its copy 2 px to the right on a 12x12 image. J = 24/48. Boundaries are the 24-px rings of
    the 7x7 squares [2, 8]^2 and [2, 8] x [4, 10]; the tolerance is ceil(0.008 * 16.97) = 1 px (a plus-shaped
    disk). Of the shifted ring, the left column matches at rows 2, 3, 7, 8 (4 of 7), the right column nowhere,
    the top and bottom rows at columns 5-9 (5 + 5): 14 of 24; recall is the mirror image: F = 14/24. With a 2-px
    tolerance every boundary pixel matches: F = 1."""
    gt, pred = square(12, 3, 3, 6), square(12, 3, 5, 6)
    assert region_similarity(pred, gt) == pytest.approx(24 / 48)
    assert contour_accuracy(pred, gt) == pytest.approx(14 / 24)
    assert contour_accuracy(pred, gt, bound_th=2) == 1.0
    assert contour_accuracy(gt, gt) == 1.0 and region_similarity(gt, gt) == 1.0


def test_j_and_f_of_empty_and_absent_objects():
    """Per object: absent from both ground truth and prediction J = F = 1; predicted but absent, or present but
    missed, J = F = 0; void ground-truth pixels count for neither (J) and are cleared before the boundaries (F)."""
    gt = np.zeros((12, 12), np.int64)
    gt[3:9, 3:9] = 1
    pred = gt.copy()
    pred[0:2, 0:2] = 3  # object 3 predicted where the ground truth has none
    j, f = davis_frame(pred, gt, objects=[1, 2, 3])
    assert j == [1.0, 1.0, 0.0] and f == [1.0, 1.0, 0.0]
    j, f = davis_frame(np.zeros_like(gt), gt, objects=[1])
    assert j == [0.0] and f == [0.0]
    void = gt.copy()
    void[3:9, 8] = 255  # the square's last column is void: a 6x5 object
    j, f = davis_frame(pred, void, objects=[1])
    assert j == [1.0] and f == [1.0]  # the predicted column over the void band counts for nothing
    assert davis_frame(pred, void, objects=[1], void_id=None)[0] == [pytest.approx(30 / 36)]
    assert davis_statistics([0.2, 0.5, 0.9, 1.0]) == {"mean": pytest.approx(0.65), "recall": 0.5}  # > 0.5 strictly
    assert davis_statistics([]) == {"mean": None, "recall": None}


@pytest.mark.parametrize("seed", range(6))
def test_f_matches_an_independent_distance_transform_implementation(seed):
    """Random blobs (thresholded smoothed noise) of several sizes, with and without void: the boundary map and F
    (disk dilation on a cropped box) equal a distance-transform reading of the same definition."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    shape = [(48, 64), (90, 160), (31, 17)][seed % 3]
    blobs = [gaussian_filter(rng.normal(size=shape), 3) > t for t in (0.05, 0.1)]
    pred, gt = blobs[0], np.roll(blobs[1], seed, axis=1)
    void = (rng.random(shape) < 0.02) if seed % 2 else None
    assert (boundary_map(gt) == boundary_reference(gt)).all()
    for bound in (0.008, 0.03, 2):
        assert contour_accuracy(pred, gt, void, bound) == pytest.approx(davis_f_reference(pred, gt, void, bound))
    keep = np.ones(shape, bool) if void is None else ~void
    assert region_similarity(pred, gt, void) == pytest.approx(((pred & gt & keep).sum()) / ((pred | gt) & keep).sum())


# --------------------------------------------------------------------------- the DINO protocol


def test_dino_preset_is_dinos_protocol():
    """DINO's eval_video_segmentation.py: n_last_frames 7, size_mask_neighborhood 12 (every context frame),
    topk 5, exp(cosine / 0.1), first mask downsampled to the grid (nearest), frames at 480p."""
    dino = video_protocol("dino")
    assert (dino.k, dino.temperature, dino.propagate, dino.radius, dino.first_radius, dino.first_labels,
            dino.resolution) == (5, 0.1, 7, 12, 12, "nearest", 480)
    first = video_protocol("first")
    assert (first.k, first.temperature, first.propagate, first.first_radius, first.resolution) == (
        30, 0.02, 0, None, None)
    assert video_protocol("dino", radius=4).radius == 4


def test_first_frame_labels_nearest_and_area():
    """`nearest`: the id at each patch centre one-hot (PIL's nearest resize to the grid); `area`: class fractions of
    the patch's pixels at the network input, void left out (as the memory bank's soft labels)."""
    mask = np.zeros((4, 8), np.int64)
    mask[:, 1] = 1  # patch (0, 0) covers columns 0-3: centre pixel column 2 is background, a quarter is object 1
    mask[1:3, 4:8] = 255  # patch (0, 1): its middle rows void
    nearest = anchor_labels(mask, (1, 2), (4, 8), 2, "nearest")
    assert nearest.tolist() == [[1.0, 0.0], [0.0, 0.0]]  # PIL samples pixels (2, 2) and (2, 6)
    area = anchor_labels(mask, (1, 2), (4, 8), 2, "area")
    assert area.tolist() == [[0.75, 0.25], [1.0, 0.0]]


def test_exclusive_candidates_replace_the_bank():
    """Extra candidates with `exclusive` set are the only neighbours: the bank is not searched."""
    bank = MemoryBank.from_arrays(np.eye(4, dtype=np.float32), np.eye(4, 2, dtype=np.float32), {})

    class Only:
        exclusive = True

        def candidates(self, query, k):
            return torch.zeros(len(query), k), torch.tensor([0.0, 1.0]).expand(len(query), k, 2)

    transfer = LabelTransfer.from_bank(bank, k=2)
    transfer.index.search = lambda *args: pytest.fail("the bank was searched")
    probs = transfer(torch.eye(4)[None], extra=Only())
    assert probs[0].tolist() == [[0.0, 1.0]] * 4


def write_objects_clip(root: Path, frames: int = 8, palette: bool = True, drift: bool = True) -> tuple[Path, Path]:
    """frames/<i>.png and masks/<i>.png of every frame: object 1 a red square moving right along the top, object 2
    a square moving right along the bottom whose colour turns from blue to green (`drift`) over a fixed grey
    texture; masks as DAVIS-2017 palette PNGs (`palette`) or single-channel ids."""
    rng = np.random.default_rng(0)
    texture = rng.integers(60, 160, (SIZE, SIZE, 1)).repeat(3, axis=2).astype(np.uint8)
    images, masks = root / "frames", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i in range(frames):
        t = i / (frames - 1) if drift else 0.0
        image, mask = texture.copy(), np.zeros((SIZE, SIZE), np.uint8)
        for obj, (top, colour) in enumerate([(6, RED), (40, np.round((1 - t) * BLUE + t * GREEN))], start=1):
            where = square(SIZE, top, 4 + STEP * i, SIDE)
            image[where], mask[where] = colour, obj
        Image.fromarray(image).save(images / f"{i:05d}.png")
        written = Image.fromarray(mask)
        if palette:
            written = written.convert("P")
            written.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
        written.save(masks / f"{i:05d}.png")
    return images, masks


def test_dino_protocol_propagates_two_moving_objects(tmp_path):
    """Two 16-px squares move 3 px a frame; the lower one turns from blue to green, so that after a few frames the
    first frame holds nothing like it (first-frame-only J under 0.1 on the last frames, measured 0). The DINO
    protocol (its preset; frames at 128 px: a 16x16 grid of 4x4-px frame patches, radius 12 patches) carries both
    along through the predicted frames. Errors are patches cut by a square's edge: the first frame's one-hot labels
    (each patch takes its centre pixel's id) move an edge by up to one 4-px band, 64 of a 256-px square; a band on
    two edges gives J ~0.6. BOUND = 0.6 allows that per object and frame (measured 0.64-0.98; 0.82-0.98 with `area`
    first-frame labels)."""
    frames, masks = write_objects_clip(tmp_path)
    first, dino = tmp_path / "first", tmp_path / "dino"
    base = ["video", "--frames", str(frames), "--masks", str(masks), "--annotate", "first", "--resolution", "128",
            "--no-whiten", *TINY]  # raw features, as `video --davis` runs the protocols
    assert main([*base, "--out", str(first), "--protocol", "first"]) == 0
    assert main([*base, "--out", str(dino), "--protocol", "dino"]) == 0
    summary = json.loads((dino / "summary.json").read_text())
    assert summary["protocol"] == "dino" and summary["protocol_options"] == {**video_protocol("dino").to_dict(),
                                                                              "resolution": 128}
    assert summary["segmenter"]["input_size"] == [128, 128] and summary["segmenter"]["num_classes"] == 3
    objects = [[frame["j"][obj] for frame in summary["video"]["frames"][1:]] for obj in ("1", "2")]
    assert min(objects[0]) > 0.6 and min(objects[1]) > 0.6, objects
    lost = json.loads((first / "summary.json").read_text())["video"]["frames"]
    assert max(frame["j"]["2"] for frame in lost[-3:]) < 0.1  # the clip needs propagation
    written = Image.open(dino / "masks" / "00005.png")
    assert written.mode == "P" and set(np.unique(np.asarray(written))) <= {0, 1, 2}


# --------------------------------------------------------------------------- DAVIS folders


def write_davis(root: Path, frames: int = 6) -> Path:
    """A DAVIS folder at the 480p level: `two` (DAVIS-2017 palette masks, objects 1 and 2) and `one` (DAVIS-2016
    0/1 masks of the red square only)."""
    for name, palette in (("two", True), ("one", False)):
        clip = tmp = root / "tmp" / name
        write_objects_clip(clip, frames, palette, drift=False)
        images, annotations = root / "JPEGImages" / "480p" / name, root / "Annotations" / "480p" / name
        images.mkdir(parents=True)
        annotations.mkdir(parents=True)
        for path in sorted((tmp / "frames").iterdir()):
            Image.open(path).convert("RGB").save(images / f"{path.stem}.jpg", quality=95)
            mask = np.asarray(Image.open(tmp / "masks" / path.name))
            if palette:
                Image.open(tmp / "masks" / path.name).save(annotations / path.name)
            else:
                Image.fromarray((mask == 1).astype(np.uint8)).save(annotations / path.name)
    return root


def test_davis_folder_with_two_protocols_from_one_extraction(tmp_path, monkeypatch, capsys):
    """Every frame's mask is written per protocol and sequence; frames 1..N-2 are scored, per object; one feature
    extraction per sequence serves both protocols (same input size); the table is printed and written."""
    import hummingbird_fungi.segment.video as video

    root = write_davis(tmp_path / "davis")
    calls = []
    extract = video.extract_clip
    monkeypatch.setattr(video, "extract_clip", lambda *args, **kwargs: calls.append(1) or extract(*args, **kwargs))
    out = tmp_path / "out"
    assert main(["video", "--davis", str(root), "--out", str(out), "--protocol", "first", "dino",
                 "--resolution", "128", *TINY]) == 0
    assert len(calls) == 2  # one per sequence
    printed = capsys.readouterr().out
    assert "J&F-mean" in printed and "F-recall" in printed and "protocol dino" in printed
    summary = json.loads((out / "summary.json").read_text())
    for name in ("first", "dino"):
        for sequence, objects in (("two", 2), ("one", 1)):
            assert sorted(p.name for p in (out / name / sequence / "masks").iterdir()) == [
                f"{i:05d}.png" for i in range(6)]
            row = summary["protocols"][name]["sequences"][sequence]
            assert row["frames_scored"] == 4 and len(row["objects"]) == objects and row["frames_per_s"] > 0
            assert row["jf_mean"] == pytest.approx((row["j_mean"] + row["f_mean"]) / 2)
        detail = json.loads((out / name / "two" / "summary.json").read_text())["video"]["frames"]
        assert [("j" in frame) for frame in detail] == [False, True, True, True, True, False]
        per_object = [o["j_mean"] for row in summary["protocols"][name]["sequences"].values()
                      for o in row["objects"].values()]
        assert summary["protocols"][name]["mean"]["j_mean"] == pytest.approx(np.mean(per_object))  # over objects
    with open(out / "table.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["protocol"], r["sequence"]) for r in rows] == [
        ("first", "one"), ("first", "two"), ("first", "mean"), ("dino", "one"), ("dino", "two"), ("dino", "mean")]
    assert summary["protocols"]["dino"]["mean"]["j_mean"] > 0.6  # as in the two-object test above


@pytest.mark.parametrize("problem", ["unknown sequence", "no annotations", "no first mask"])
def test_bad_davis_input_is_named_before_the_model_loads(tmp_path, problem, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the DAVIS folder was checked")

    monkeypatch.setattr("hummingbird_fungi.segment.video.create_encoder", refuse)
    root = write_davis(tmp_path / "davis", frames=3)
    annotations = root / "Annotations" / "480p"
    extra, named = [], None
    if problem == "unknown sequence":
        extra, named = ["--sequence", "three"], root / "JPEGImages" / "480p" / "three"
    elif problem == "no annotations":
        for file in (annotations / "one").iterdir():
            file.unlink()
        (annotations / "one").rmdir()
        named = annotations / "one"
    else:
        (annotations / "two" / "00000.png").unlink()
        named = annotations / "two" / "00000.png"
    out = tmp_path / "out"
    assert main(["video", "--davis", str(root), "--out", str(out), *extra, *TINY]) == 2
    assert str(named) in capsys.readouterr().err and not out.exists()


def test_davis_evaluation_takes_any_model(tmp_path):
    """One call for any encoder: a feature function (each patch's mean colour) and a timm ViT with FUNGI."""
    root = write_davis(tmp_path / "davis")

    def colour(model, images):
        return torch.nn.functional.avg_pool2d(images, 8).flatten(2).transpose(1, 2)

    score, summary = davis_evaluation(torch.nn.Identity(), root, "dino", ftr_extr_fn=colour, patch_size=8,
                                      d_model=3, device="cpu", resolution=128, return_details=True)
    assert score == summary["protocols"]["dino"]["mean"]["jf_mean"]
    assert summary["protocols"]["dino"]["mean"]["j_mean"] > 0.6  # as in the two-object test
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, patch_size=8, depth=2, img_size=64,
                            dynamic_img_size=True, num_classes=0)
    out = tmp_path / "fungi"
    fungi = davis_evaluation(vit, root, "first", sequences=["one"], out=out, features=FeatureOptions(kind="fungi"),
                             device="cpu", resolution=64)
    written = json.loads((out / "summary.json").read_text())
    assert written["segmenter"]["features"]["kind"] == "fungi" and 0 <= fungi <= 1
    assert (out / "one" / "masks" / "00002.png").is_file()

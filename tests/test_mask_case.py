"""Extensions match in any case: `E0.JPG` + `E0.PNG` examples, `00000.PNG` video masks, `q0.PNG` ground truth and
folder-dataset annotations are found; two masks of one stem that differ only by the extension's case are refused."""

import json
from pathlib import Path

import pytest
from PIL import Image

from hummingbird_fungi.cli.main import main
from hummingbird_fungi.data.segmentation import build_dataset
from hummingbird_fungi.errors import DataError
from hummingbird_fungi.segment.folders import example_pairs, masks_by_stem
from hummingbird_fungi.segment.video import video_inputs
from hummingbird_fungi.testing import make_folder_dataset
from test_segmenter import CLI_MODEL, toy_scene


def write_pair(images: Path, masks: Path, stem: str, image_ext: str, mask_ext: str, split: float = 0.4) -> None:
    """One toy scene as `images/<stem><image_ext>` and its mask as `masks/<stem><mask_ext>`."""
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    image, mask = toy_scene(40, 56, split)
    Image.fromarray(image).save(images / f"{stem}{image_ext}", format="JPEG" if "jp" in image_ext.lower() else "PNG")
    Image.fromarray(mask).save(masks / f"{stem}{mask_ext}", format="PNG")


def test_upper_case_examples_and_video_masks_are_found(tmp_path):
    for i, split in enumerate((0.3, 0.6)):
        write_pair(tmp_path / "ex" / "images", tmp_path / "ex" / "masks", f"E{i}", ".JPG", ".PNG", split)
    images, masks, failed = example_pairs(tmp_path / "ex")
    assert [p.name for p in images] == ["E0.JPG", "E1.JPG"] and [p.name for p in masks] == ["E0.PNG", "E1.PNG"]
    assert failed == []
    for i in range(3):
        write_pair(tmp_path / "frames", tmp_path / "masks", f"{i:05d}", ".png", ".PNG")
    files, annotated, truth = video_inputs(tmp_path / "frames", tmp_path / "masks", "first")
    assert annotated == {"00000": tmp_path / "masks" / "00000.PNG"} and sorted(truth) == ["00001", "00002"]


def test_upper_case_ground_truth_is_scored(tmp_path):
    for i, split in enumerate((0.3, 0.6)):
        write_pair(tmp_path / "ex" / "images", tmp_path / "ex" / "masks", f"e{i}", ".png", ".png", split)
    write_pair(tmp_path / "queries", tmp_path / "truth", "q0", ".jpg", ".PNG")
    out = tmp_path / "out"
    assert main(["segment", "--examples", str(tmp_path / "ex"), "--images", str(tmp_path / "queries"),
                 "--ground-truth", str(tmp_path / "truth"), "--out", str(out), *CLI_MODEL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["segment"]["images"][0]["ground_truth"] == str(tmp_path / "truth" / "q0.PNG")
    assert summary["metrics"]["miou"] is not None


def test_folder_dataset_finds_upper_case_annotations(tmp_path):
    root = make_folder_dataset(tmp_path / "toy", n_train=2, n_val=1)
    mask = root / "annotations" / "train" / "train001.png"
    mask.rename(mask.with_suffix(".PNG"))
    dataset = build_dataset("folder", root, "train")
    assert [mask.name for _, mask in dataset.samples] == ["train000.png", "train001.PNG"]


def test_two_masks_of_one_stem_differing_by_case_are_refused(tmp_path):
    write_pair(tmp_path / "images", tmp_path / "masks", "a", ".png", ".png")
    Image.open(tmp_path / "masks" / "a.png").save(tmp_path / "masks" / "a.PNG")
    if len(list((tmp_path / "masks").iterdir())) < 2:
        pytest.skip("case-insensitive file system")
    with pytest.raises(DataError) as error:
        masks_by_stem(tmp_path / "masks")
    assert str(tmp_path / "masks" / "a.PNG") in str(error.value)
    assert str(tmp_path / "masks" / "a.png") in str(error.value)


def test_upper_case_tar_roots_are_archives(tmp_path):
    import tarfile

    from hummingbird_fungi.data.archives import TarPath, as_path

    make_folder_dataset(tmp_path / "toy")
    archive = tmp_path / "TOY.TAR"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "toy", arcname="toy")
    assert isinstance(as_path(str(archive)), TarPath) and isinstance(as_path(f"{archive}!/toy"), TarPath)
    assert len(build_dataset("folder", f"{archive}!/toy", "val")) == len(build_dataset("folder", tmp_path / "toy", "val"))


def test_a_palette_of_the_wrong_length_is_refused_before_the_model(tmp_path, monkeypatch):
    from hummingbird_fungi.errors import ConfigError
    from hummingbird_fungi.segment.segmenter import InContextSegmenter

    images, masks = tmp_path / "images", tmp_path / "masks"
    write_pair(images, masks, "e0", ".png", ".png")
    monkeypatch.setattr("hummingbird_fungi.segment.segmenter.create_encoder", lambda *a, **k: pytest.fail("model"))
    with pytest.raises(ConfigError, match="palette.*3 classes"):
        InContextSegmenter.from_examples([images / "e0.png"], [masks / "e0.png"], num_classes=3,
                                         palette=[[0, 0, 0], [255, 0, 0]], device="cpu")

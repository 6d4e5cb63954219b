"""Planted symbolic links under --out: no command (`segment`, `video`, `demo`) and no folder-run API writes
through one. A linked output folder is refused; a linked output file is replaced by the new file; in every case
the file the link points to keeps its bytes."""

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from hummingbird_fungi.cli.main import main
from hummingbird_fungi.errors import DataError
from hummingbird_fungi.segment.folders import list_images, segment_folder
from hummingbird_fungi.segment.segmenter import InContextSegmenter
from hummingbird_fungi.segment.video import run_video
from test_segmenter import CLI_MODEL, TINY, toy_scene

COMMANDS = ("segment", "video", "demo")
# the files each command writes (with ground truth for segment), and one mask and overlay; the demo runs without
# ground truth: with it, its memory sweep stops with a TypeError (build_segmenter gets `memory` twice)
WRITTEN = {"segment": ["summary.json", "grid.png", "per_class_iou.png", "masks/v0.png", "overlays/v1.png"],
           "video": ["summary.json", "strip.png", "masks/00001.png", "overlays/00002.png"],
           "demo": ["summary.json", "grid.png", "masks/v0.png", "overlays/v1.png"]}


def digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_pairs(folder: Path, sizes: list[tuple[int, int, float]], prefix: str) -> Path:
    """`folder/images/<prefix>i.png` and `folder/masks/<prefix>i.png` of toy scenes."""
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    for i, size in enumerate(sizes):
        image, mask = toy_scene(*size)
        Image.fromarray(image).save(folder / "images" / f"{prefix}{i}.png")
        Image.fromarray(mask).save(folder / "masks" / f"{prefix}{i}.png")
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Examples, query images with ground truth, and a 4-frame clip (first frame annotated)."""
    root = tmp_path_factory.mktemp("inputs")
    write_pairs(root / "ex", [(40, 56, 0.3), (48, 64, 0.5), (40, 48, 0.7)], "e")
    write_pairs(root / "val", [(36, 52, 0.4), (44, 60, 0.6)], "v")
    for sub in ("frames", "clip_masks"):
        (root / sub).mkdir()
    for i in range(4):
        image, mask = toy_scene(48, 64, 0.3 + 0.1 * i)
        Image.fromarray(image).save(root / "frames" / f"{i:05d}.png")
        if i == 0:
            Image.fromarray(mask).save(root / "clip_masks" / f"{i:05d}.png")
    return {"examples": root / "ex", "images": root / "val" / "images", "truth": root / "val" / "masks",
            "frames": root / "frames", "masks": root / "clip_masks"}


def command(name: str, inputs: dict[str, Path], out: Path) -> list[str]:
    """The command line of `name` on the inputs, writing to `out`."""
    if name == "video":
        args = ["--frames", inputs["frames"], "--masks", inputs["masks"]]
    else:
        args = ["--examples", inputs["examples"], "--images", inputs["images"]]
    if name == "segment":
        args += ["--ground-truth", inputs["truth"]]
    return [name, *map(str, args), "--out", str(out), *CLI_MODEL]


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside --out whose files the planted links point to."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "keep.png").write_bytes(b"precious, not a png")
    return folder


@pytest.mark.parametrize("folder", ["masks", "overlays"])
@pytest.mark.parametrize("name", COMMANDS)
def test_a_linked_output_folder_is_refused(tmp_path, inputs, outside, name, folder, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / folder).symlink_to(outside, target_is_directory=True)
    before = digest(outside)
    assert main(command(name, inputs, out)) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert digest(outside) == before and (out / folder).is_symlink()


@pytest.mark.parametrize("name", COMMANDS)
def test_linked_output_files_are_replaced_not_followed(tmp_path, inputs, outside, name):
    out = tmp_path / "out"
    for file in WRITTEN[name]:
        (out / file).parent.mkdir(parents=True, exist_ok=True)
        target = outside / file.replace("/", "_")
        target.write_bytes(f"precious {file}".encode())
        (out / file).symlink_to(target)
    before = digest(outside)
    assert main(command(name, inputs, out)) == 0
    assert digest(outside) == before
    for file in WRITTEN[name]:
        assert (out / file).is_file() and not (out / file).is_symlink(), file


def test_the_folder_run_apis_refuse_a_linked_output_folder(tmp_path, inputs, outside):
    """Without the command line's early check: segment_folder and run_video themselves refuse the link."""
    examples = sorted((inputs["examples"] / "images").iterdir())
    segmenter = InContextSegmenter.from_examples(examples, [inputs["examples"] / "masks" / p.name for p in examples],
                                                 backbone="vit_tiny_patch16_224", pretrained=False,
                                                 backbone_kwargs=TINY, input_size=(64, 96), device="cpu")
    before = digest(outside)
    for run, folder in [("segment", "masks"), ("segment", "overlays"), ("video", "masks")]:
        out = tmp_path / f"{run}_{folder}"
        out.mkdir()
        (out / folder).symlink_to(outside, target_is_directory=True)
        with pytest.raises(DataError, match="symbolic link"):
            if run == "segment":
                segment_folder(segmenter, inputs["images"], out, listing=list_images(inputs["images"]))
            else:
                run_video(inputs["frames"], inputs["masks"], out, backbone="vit_tiny_patch16_224", pretrained=False,
                          backbone_kwargs=TINY, input_size=(64, 96), device="cpu")
        assert digest(outside) == before and not (out / "summary.json").exists()

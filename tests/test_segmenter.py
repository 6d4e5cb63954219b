"""In-context segmentation: original-size masks, EXIF, API == CLI, broken inputs, saved banks."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hummingbird_fungi.testing import VOID
from PIL import Image

from hummingbird_fungi.models.backbones import load_backbone
from hummingbird_fungi.cli.main import main
from hummingbird_fungi.config.schema import FeatureOptions, RetrievalOptions
from hummingbird_fungi.errors import BankMismatchError, ConfigError
from hummingbird_fungi.segment.segmenter import InContextSegmenter, as_rgb, default_input_size, label_space

TINY = {"depth": 2, "patch_size": 8}
INPUT = (64, 96)  # (H, W) network input
COLOURS = np.array([[30, 60, 200], [220, 40, 30], [40, 170, 60]], np.uint8)  # class 0, 1, 2


def toy_scene(height: int, width: int, split: float, stripe: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Flat colours: class 0 left of `split`, class 1 right of it, optional class-2 band at the bottom."""
    mask = np.zeros((height, width), np.uint8)
    mask[:, int(split * width):] = 1
    if stripe:
        mask[int(0.75 * height):] = 2
    return COLOURS[mask], mask


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    """`<dir>/images/*.png` + `<dir>/masks/*.png`: three toy scenes of different sizes."""
    root = tmp_path_factory.mktemp("examples")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i, (size, split) in enumerate([((48, 72), 0.3), ((60, 80), 0.5), ((40, 64), 0.7)]):
        image, mask = toy_scene(*size, split)
        Image.fromarray(image).save(root / "images" / f"ex{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"ex{i}.png")
    return root


@pytest.fixture(scope="module")
def segmenter(examples) -> InContextSegmenter:
    """A segmenter on a 2-block random ViT with patch 8, seeded like the CLI's."""
    images = sorted((examples / "images").iterdir())
    masks = [examples / "masks" / p.name for p in images]
    return InContextSegmenter.from_examples(images, masks, backbone="vit_tiny_patch16_224", pretrained=False,
                                            backbone_kwargs=TINY, input_size=INPUT, device="cpu", retrieval=RetrievalOptions(k=10),
                                            features=FeatureOptions())  # raw embeddings of the random net


CLI_MODEL = ["--backbone", "vit_tiny_patch16_224", "--random-init", "--backbone-option", "depth=2",
             "--backbone-option", "patch_size=8", "--input-size", f"{INPUT[0]}x{INPUT[1]}", "--device", "cpu",
             "--k", "10", "--features", "embeddings", "--no-whiten"]


def test_toy_scene_segmented_right(segmenter):
    image, mask = toy_scene(56, 88, 0.45)
    pred = segmenter.predict(Image.fromarray(image))
    assert pred.shape == mask.shape and pred.dtype == np.uint8
    assert (pred == mask).mean() > 0.9
    assert segmenter.num_classes == 3


def test_odd_size_predicts_at_original_size(segmenter):
    image, _ = toy_scene(37, 53, 0.5)
    assert segmenter.predict(image).shape == (37, 53)
    proba = segmenter.predict_proba(image)
    assert proba.shape == (3, 37, 53) and proba.dtype == np.float32
    assert np.allclose(proba.sum(0), 1, atol=1e-3)
    portrait, _ = toy_scene(101, 23, 0.5)
    assert segmenter.predict(portrait).shape == (101, 23)


def test_exif_rotated_jpeg_gives_mask_of_displayed_size(segmenter, tmp_path):
    image, _ = toy_scene(40, 60, 0.4)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(image).save(path, exif=exif.tobytes(), quality=95)
    pred = segmenter.predict(path)
    assert pred.shape == (60, 40)  # (h, w) as displayed
    displayed = np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270))  # pixels only, no EXIF
    assert np.array_equal(pred, segmenter.predict(displayed))


def test_image_modes_are_handled(segmenter, tmp_path):
    image, _ = toy_scene(30, 45, 0.5)
    rgb = Image.fromarray(image)
    files = {"grey.png": rgb.convert("L"), "rgba.png": rgb.convert("RGBA"), "cmyk.jpg": rgb.convert("CMYK"),
             "grey16.png": Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257))}
    for name, picture in files.items():
        picture.save(tmp_path / name)
        assert segmenter.predict(tmp_path / name).shape == (30, 45), name
    # an in-memory 16-bit image is scaled to 8 bits as its file is, not clipped
    in_memory = np.asarray(as_rgb(Image.open(tmp_path / "grey16.png")))
    assert np.array_equal(in_memory, np.asarray(as_rgb(tmp_path / "grey16.png")))
    assert np.array_equal(in_memory[..., 0], np.asarray(rgb.convert("L")))


def test_batch_equals_single(segmenter):
    images = [toy_scene(h, w, s)[0] for h, w, s in [(37, 53, 0.3), (64, 64, 0.6), (90, 31, 0.5)]]
    batch = segmenter.predict_batch(images, batch_size=2)
    for image, pred in zip(images, batch):
        assert np.array_equal(pred, segmenter.predict(image))


def test_api_and_cli_give_the_same_masks_and_broken_files_are_skipped(segmenter, examples, tmp_path, caplog):
    queries = tmp_path / "queries"
    queries.mkdir()
    for i, (h, w, s) in enumerate([(37, 53, 0.3), (70, 50, 0.6), (48, 96, 0.5)]):
        Image.fromarray(toy_scene(h, w, s)[0]).save(queries / f"q{i}.png")
    (queries / "broken.jpg").write_bytes(b"this is not a jpeg")
    (queries / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main(["segment", "--examples", str(examples), "--images", str(queries), "--out", str(out)] + CLI_MODEL) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [Path(f["file"]).name for f in summary["segment"]["failed"]] == ["broken.jpg"]
    assert "broken.jpg" in caplog.text
    assert summary["ignored_files"] == ["notes.txt"]
    for i in range(3):
        written = np.asarray(Image.open(out / "masks" / f"q{i}.png"))
        assert np.array_equal(written, segmenter.predict(queries / f"q{i}.png"))
        assert (out / "overlays" / f"q{i}.png").is_file()
    assert not (out / "masks" / "broken.png").exists()
    assert (out / "grid.png").is_file()


def test_ground_truth_adds_metrics(examples, tmp_path):
    queries, truth = tmp_path / "q", tmp_path / "gt"
    queries.mkdir()
    truth.mkdir()
    for i, (h, w, s) in enumerate([(45, 67, 0.35), (58, 80, 0.65)]):
        image, mask = toy_scene(h, w, s)
        Image.fromarray(image).save(queries / f"s{i}.png")
        Image.fromarray(mask).save(truth / f"s{i}.png")
    out = tmp_path / "out"
    args = ["segment", "--examples", str(examples), "--images", str(queries), "--ground-truth", str(truth),
            "--out", str(out), "--class-names", "blue,red,green"]
    assert main(args + CLI_MODEL) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["miou"] > 0.8
    assert set(summary["metrics"]["per_class_iou"]) == {"blue", "red", "green"}
    assert (out / "per_class_iou.png").is_file()


def test_saved_bank_round_trip_and_mismatch_refused(segmenter, examples, tmp_path):
    path = segmenter.save(tmp_path / "bank")
    loaded = InContextSegmenter.from_memory(path, device="cpu", retrieval=RetrievalOptions(k=10))
    image, _ = toy_scene(41, 59, 0.5)
    assert np.array_equal(loaded.predict(image), segmenter.predict(image))
    other = load_backbone("vit_small_patch16_224", pretrained=False, depth=1, patch_size=8)
    with pytest.raises(BankMismatchError):
        InContextSegmenter.from_memory(path, backbone=other, device="cpu")
    out = tmp_path / "out"
    queries = examples / "images"
    assert main(["segment", "--memory", str(path), "--images", str(queries), "--out", str(out),
                 "--device", "cpu", "--k", "10"]) == 0
    for file in queries.iterdir():
        assert np.array_equal(np.asarray(Image.open(out / "masks" / f"{file.stem}.png")), segmenter.predict(file))


def test_fungi_features_segment_and_reload(examples, tmp_path):
    images = sorted((examples / "images").iterdir())[:2]
    masks = [examples / "masks" / p.name for p in images]
    seg = InContextSegmenter.from_examples(images, masks, backbone="vit_tiny_patch16_224", pretrained=False,
                                           backbone_kwargs=TINY, input_size=(48, 64), device="cpu", retrieval=RetrievalOptions(k=5),
                                           features=FeatureOptions.from_mapping({"kind": "fungi",
                                                                                 "fungi": {"head_dim": 16}}))
    image, mask = toy_scene(37, 53, 0.5)
    assert (seg.predict(image) == mask).mean() > 0.8
    loaded = InContextSegmenter.from_memory(seg.save(tmp_path / "bank"), device="cpu", retrieval=RetrievalOptions(k=5))
    assert np.array_equal(loaded.predict(image), seg.predict(image))


def test_fungi_support_set_is_saved_with_the_bank(examples, tmp_path):
    images = sorted((examples / "images").iterdir())
    masks = [examples / "masks" / p.name for p in images]
    seg = InContextSegmenter.from_examples(images, masks, backbone="vit_tiny_patch16_224", pretrained=False,
                                           backbone_kwargs=TINY, input_size=(48, 64), device="cpu", retrieval=RetrievalOptions(k=5),
                                           features=FeatureOptions.from_mapping(
                                               {"kind": "fungi", "fungi": {"head_dim": 16, "negatives": "support"}}))
    path = seg.save(tmp_path / "bank")
    assert (path / "support_features.npy").is_file() and (path / "support_images.npy").is_file()
    loaded = InContextSegmenter.from_memory(path, device="cpu", retrieval=RetrievalOptions(k=5))
    image, _ = toy_scene(37, 53, 0.5)
    assert np.array_equal(loaded.predict_proba(image), seg.predict_proba(image))
    assert torch.equal(loaded.bank.row_images(), seg.bank.row_images())  # the shards keep their image ranges
    (path / "support_features.npy").unlink()
    with pytest.raises(ConfigError, match="support_features.npy"):
        InContextSegmenter.from_memory(path, device="cpu", retrieval=RetrievalOptions(k=5))


def test_label_space_and_input_size():
    masks = [np.array([[0, 1], [255, 2]])]
    assert label_space(masks, None, None) == (3, 255)
    assert label_space(masks, 21, None) == (21, 255)
    assert label_space([np.array([[0, 4]])], None, None) == (5, None)
    with pytest.raises(ConfigError):
        label_space(masks, None, 1)
    assert default_input_size([(360, 480)], 14) == (336, 448)
    assert default_input_size([(480, 360), (500, 300), (400, 300)], 16) == (448, 336)  # median aspect, portrait


def test_bank_from_build_memory_keeps_its_void_id(toy_dataset, tmp_path):
    bank = tmp_path / "bank"
    assert main(["build-memory", "--out", str(tmp_path / "build.json"), "model.name=vit_tiny_patch16_224",
                 "model.pretrained=false", "model.input_size=[64,64]", "data.kind=folder", f"data.root={toy_dataset}",
                 "data.train_split=train", "data.num_workers=0", "memory.size=40", f"memory.path={bank}"]) == 0
    net = load_backbone("vit_tiny_patch16_224", pretrained=False)  # the random ViT the bank was built with
    seg = InContextSegmenter.from_memory(bank, backbone=net, device="cpu", retrieval=RetrievalOptions(k=5))
    assert seg.ignore_index == VOID and seg.confusion_matrix().ignore_index == VOID

"""VOC (both layouts), ADE20K and folder datasets built from tiny generated files; validation errors; collate."""

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from hummingbird_fungi.data.segmentation import (
    ADE20K_CLASSES, VOC_CLASSES, VOC_INFO, DatasetInfo, SegmentationDataset, ade20k_dataset, build_dataset, collate,
    folder_dataset, read_file_set, voc_dataset,
)
from hummingbird_fungi.errors import ConfigError, DataError
from hummingbird_fungi.data.transforms import EvalTransform, TrainTransform

TINY = DatasetInfo("tiny", 4, 255, ("a", "b", "c", "d"), False)


def write_image(path: Path, size=(12, 8), seed=0) -> Path:
    """A random RGB image of size (w, h) at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_mask(path: Path, value: int, size=(12, 8), palette=False, border=True) -> Path:
    """A mask of size (w, h) holding `value` (top row 255 if `border`), as an L or palette PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = np.full((size[1], size[0]), value, dtype=np.uint8)
    if border:
        ids[0] = 255
    mask = Image.fromarray(ids, mode="L")
    if palette:
        mask = mask.convert("P")
        mask.putpalette([(7 * i) % 256 for i in range(768)])
    mask.save(path)
    return path


def write_list(path: Path, ids) -> Path:
    """An id list file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(ids) + "\n")
    return path


def make_voc_flat(root: Path) -> Path:
    """Layout A: ids a..d; train/trainaug masks (SegmentationClassAug) hold 1, val masks 2."""
    for i, name in enumerate("abcd"):
        write_image(root / "images" / f"{name}.jpg", seed=i)
        write_mask(root / "SegmentationClassAug" / f"{name}.png", 1)
        write_mask(root / "SegmentationClass" / f"{name}.png", 2, palette=True)
    write_list(root / "sets" / "train.txt", ["b", "a"])
    write_list(root / "sets" / "trainaug.txt", ["c", "b", "a"])
    write_list(root / "sets" / "val.txt", ["d"])
    return root


def make_voc_official(root: Path, sbd: str | None = "mat") -> Path:
    """Layout B: VOC train {t1, t2}, val {v1}; SBD train {s1, t1}, val {s2, v1}; SBD masks hold 5, VOC's 3."""
    voc = root / "VOCdevkit" / "VOC2012"
    for i, name in enumerate(["t1", "t2", "v1", "s1", "s2"]):
        write_image(voc / "JPEGImages" / f"{name}.jpg", seed=i)
    for name in ["t1", "t2", "v1"]:
        write_mask(voc / "SegmentationClass" / f"{name}.png", 3, palette=True)
    write_list(voc / "ImageSets" / "Segmentation" / "train.txt", ["t1", "t2"])
    write_list(voc / "ImageSets" / "Segmentation" / "val.txt", ["v1"])
    if sbd == "mat":
        bench = root / "benchmark_RELEASE" / "dataset"
        (bench / "cls").mkdir(parents=True)
        for name in ["s1", "t1", "s2", "v1"]:
            segmentation = np.full((8, 12), 5, dtype=np.uint8)
            scipy.io.savemat(bench / "cls" / f"{name}.mat", {"GTcls": {"Segmentation": segmentation}})
        write_list(bench / "train.txt", ["s1", "t1"])
        write_list(bench / "val.txt", ["s2", "v1"])
    elif sbd == "png":
        for name in ["s1", "t1", "s2", "v1"]:
            write_mask(root / "SegmentationClassAug" / f"{name}.png", 5)
    return root


def make_ade(root: Path) -> Path:
    """ADEChallengeData2016 with 3 training images and an extra annotation that has no image."""
    for i, stem in enumerate(["ADE_train_00000002", "ADE_train_00000003", "ADE_train_00000005"]):
        write_image(root / "images" / "training" / f"{stem}.jpg", seed=i)
        write_mask(root / "annotations" / "training" / f"{stem}.png", 10 * (i + 1), border=False)
    write_mask(root / "annotations" / "training" / "ADE_train_00000001.png", 150, border=False)  # no image
    write_image(root / "images" / "validation" / "ADE_val_00000001.jpg")
    write_mask(root / "annotations" / "validation" / "ADE_val_00000001.png", 0, border=False)
    return root


def make_folder(root: Path, meta="name: camvid\nnum_classes: 11\nignore_index: 11\n") -> Path:
    """A folder dataset with train images b.png, a.jpg, c.JPEG (masks hold 2, 11 = ignore, 0)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.yaml").write_text(meta)
    for stem, ext, value in [("b", ".png", 2), ("a", ".jpg", 11), ("c", ".JPEG", 0)]:
        write_image(root / "images" / "train" / f"{stem}{ext}")
        write_mask(root / "annotations" / "train" / f"{stem}.png", value, border=False)
    (root / "images" / "train" / "notes.txt").write_text("not an image")
    return root


def mask_values(dataset, index):
    """Set of mask values of one loaded sample."""
    return set(np.unique(dataset.load(index)[1]).tolist())


def test_voc_flat_layout(tmp_path):
    root = make_voc_flat(tmp_path / "VOCSegmentation")
    train = voc_dataset(root, "trainaug")
    assert [p.stem for p, _ in train.samples] == ["a", "b", "c"]  # sorted
    assert mask_values(train, 0) == {1, 255}  # SegmentationClassAug
    val = voc_dataset(root, "val")
    assert [m.parent.name for _, m in val.samples] == ["SegmentationClass"]
    assert mask_values(val, 0) == {2, 255}  # palette indices, not colours
    assert train.info.num_classes == 21 and train.info.ignore_index == 255 and train.info.void_to_background
    assert train.info.class_names == VOC_CLASSES and VOC_CLASSES[20] == "tvmonitor"


def test_voc_official_layout_with_sbd_mat(tmp_path):
    root = make_voc_official(tmp_path / "voc", sbd="mat")
    trainaug = voc_dataset(root, "trainaug")
    assert [p.stem for p, _ in trainaug.samples] == ["s1", "s2", "t1", "t2"]  # (SBD train+val + VOC train) - val
    masks = {p.stem: m for p, m in trainaug.samples}
    assert masks["s1"].suffix == ".mat" and masks["t2"].suffix == ".png"
    assert mask_values(trainaug, 0) == {5}
    assert mask_values(trainaug, 3) == {3, 255}
    val = voc_dataset(root, "val")
    assert [p.stem for p, _ in val.samples] == ["v1"] and val.samples[0][1].suffix == ".png"
    item = voc_dataset(root, "trainaug", transform=TrainTransform((16, 16)))[0]
    assert item["image"].shape == (3, 16, 16) and set(item["mask"].unique().tolist()) == {5}


def test_voc_official_layout_with_sbd_png(tmp_path):
    root = make_voc_official(tmp_path / "voc", sbd="png")
    trainaug = voc_dataset(root, "trainaug")
    assert [p.stem for p, _ in trainaug.samples] == ["s1", "s2", "t1", "t2"]
    assert trainaug.samples[0][1] == root / "SegmentationClassAug" / "s1.png"
    assert voc_dataset(root, "train").samples[1][1].parent.name == "SegmentationClass"  # t2 is not in SBD


def test_voc_trainaug_without_sbd_is_an_error(tmp_path):
    root = make_voc_official(tmp_path / "voc", sbd=None)
    assert len(voc_dataset(root, "train")) == 2
    with pytest.raises(DataError, match="benchmark_RELEASE"):
        voc_dataset(root, "trainaug")


def test_voc_errors_name_the_missing_path(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        voc_dataset(tmp_path / "nowhere", "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="VOCdevkit"):
        voc_dataset(tmp_path / "empty", "val")
    root = make_voc_flat(tmp_path / "VOCSegmentation")
    with pytest.raises(DataError, match="test.txt"):
        voc_dataset(root, "test")
    (root / "SegmentationClassAug" / "b.png").unlink()
    with pytest.raises(DataError, match="b.png"):
        voc_dataset(root, "train")


def test_file_sets(tmp_path):
    root = make_voc_flat(tmp_path / "VOCSegmentation")
    subset = tmp_path / "trainaug_2_42.txt"
    subset.write_text("c.jpg\n\n  a  \n")
    assert read_file_set(subset) == ["c", "a"]
    dataset = voc_dataset(root, "trainaug", file_set=subset)
    assert [p.stem for p, _ in dataset.samples] == ["a", "c"]
    with pytest.raises(DataError, match="trainaug_2_42.txt"):
        voc_dataset(root, "val", file_set=subset)  # ids outside the split
    (tmp_path / "blank.txt").write_text("\n \n")
    for name in ("blank.txt", "absent.txt"):
        with pytest.raises(DataError, match=name):
            read_file_set(tmp_path / name)


def test_ade20k_pairs_by_stem(tmp_path):
    root = make_ade(tmp_path / "ADEChallengeData2016")
    train = ade20k_dataset(root, "training")
    assert [m.name for _, m in train.samples] == [f"ADE_train_0000000{i}.png" for i in (2, 3, 5)]
    assert [mask_values(train, i) for i in range(3)] == [{10}, {20}, {30}]  # sorted-position pairing would shift
    assert len(ade20k_dataset(root, "val")) == 1  # 'val' aliases 'validation'
    info = train.info
    assert (info.num_classes, info.ignore_index, info.void_to_background) == (151, 0, False)
    assert len(ADE20K_CLASSES) == 151 and ADE20K_CLASSES[:3] == ("other", "wall", "building")
    (root / "annotations" / "training" / "ADE_train_00000003.png").unlink()
    with pytest.raises(DataError, match="ADE_train_00000003"):
        ade20k_dataset(root, "training")


def test_ade20k_rejects_labels_out_of_range(tmp_path):
    root = make_ade(tmp_path / "ade")
    write_mask(root / "annotations" / "training" / "ADE_train_00000002.png", 3)
    dataset = ade20k_dataset(root, "training")
    with pytest.raises(DataError, match=r"ADE_train_00000002\.png.*\[255\]"):
        dataset[0]  # 255 is no ADE20K label


def test_folder_dataset(tmp_path):
    root = make_folder(tmp_path / "camvid")
    dataset = folder_dataset(root, "train", transform=EvalTransform((8, 12)))
    assert [p.name for p, _ in dataset.samples] == ["a.jpg", "b.png", "c.JPEG"]
    assert dataset.info == DatasetInfo("camvid", 11, 11, tuple(f"class_{i}" for i in range(11)), False)
    item = dataset[0]
    assert item["image"].shape == (3, 8, 12) and set(item["mask"].unique().tolist()) == {11}  # ignore id kept
    write_mask(root / "annotations" / "train" / "b.png", 2)
    with pytest.raises(DataError, match=r"b\.png.*\[255\]"):
        dataset[1]  # 255 is neither a class nor the ignore index 11


def test_folder_metadata(tmp_path):
    root = make_folder(tmp_path / "d", meta="classes: [sky, road, car]\n")
    dataset = build_dataset("folder", root, "train")
    assert dataset.info.name == "d" and dataset.info.class_names == ("sky", "road", "car")
    assert dataset.info.ignore_index is None
    (root / "dataset.yaml").write_text("num_classes: 2\nclasses: [sky, road, car]\n")
    with pytest.raises(DataError, match="dataset.yaml"):
        folder_dataset(root, "train")
    (root / "dataset.yaml").unlink()
    with pytest.raises(DataError, match="dataset.yaml"):
        folder_dataset(root, "train")


def test_folder_missing_and_empty_split(tmp_path):
    root = make_folder(tmp_path / "d")
    with pytest.raises(DataError, match=str(Path("images") / "val")):
        folder_dataset(root, "val")
    (root / "images" / "empty").mkdir()
    (root / "annotations" / "empty").mkdir()
    with pytest.raises(DataError, match=str(Path("images") / "empty")):
        folder_dataset(root, "empty")
    write_image(root / "images" / "train" / "a.png")
    with pytest.raises(DataError, match="share the stem"):
        folder_dataset(root, "train")


def test_empty_sample_list_names_the_source():
    with pytest.raises(DataError, match="my split"):
        SegmentationDataset([], TINY, source="my split")


def test_corrupt_image_and_size_mismatch_name_the_files(tmp_path):
    good = write_image(tmp_path / "good.jpg")
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    small = write_mask(tmp_path / "small.png", 1, size=(6, 4))
    mask = write_mask(tmp_path / "mask.png", 1)
    dataset = SegmentationDataset([(bad, mask), (good, small)], TINY)
    with pytest.raises(DataError, match="corrupt.jpg"):
        dataset[0]
    with pytest.raises(DataError, match=r"small\.png is 6x4 but image .*good\.jpg is 12x8"):
        dataset[1]


def test_labels_outside_range_name_file_and_values(tmp_path):
    image = write_image(tmp_path / "x.jpg", size=(4, 2))
    mask = tmp_path / "m.png"
    Image.fromarray(np.array([[0, 3, 9, 200], [255, 9, 1, 2]], dtype=np.uint8)).save(mask)
    with pytest.raises(DataError, match=r"m\.png.*\[9, 200\]"):
        SegmentationDataset([(image, mask)], TINY).load(0)  # 255 is TINY's ignore index
    voc = SegmentationDataset([(image, write_mask(tmp_path / "v.png", 20, size=(4, 2)))], VOC_INFO)
    assert mask_values(voc, 0) == {20, 255}  # 255 is VOC void, allowed


def test_augmentation_depends_on_seed_epoch_index_only(tmp_path):
    samples = [(write_image(tmp_path / f"{i}.png", seed=i), write_mask(tmp_path / f"{i}_m.png", i)) for i in range(3)]
    dataset = SegmentationDataset(samples, TINY, transform=TrainTransform((16, 16)), seed=7)
    forward = [dataset[i]["image"] for i in range(3)]
    backward = [dataset[i]["image"] for i in reversed(range(3))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["image"], forward[0])
    dataset.set_epoch(0)
    assert torch.equal(dataset[0]["image"], forward[0])
    other_seed = SegmentationDataset(samples, TINY, transform=TrainTransform((16, 16)), seed=8)
    assert not torch.equal(other_seed[0]["image"], forward[0])
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate)
    assert torch.equal(torch.cat([b["image"] for b in loader]), torch.stack(forward))


def test_collate_keeps_original_masks(tmp_path):
    samples = [(write_image(tmp_path / "a.png", size=(12, 8)), write_mask(tmp_path / "am.png", 1, size=(12, 8))),
               (write_image(tmp_path / "b.png", size=(7, 9)), write_mask(tmp_path / "bm.png", 2, size=(7, 9)))]
    dataset = SegmentationDataset(samples, TINY, transform=EvalTransform((8, 8)), keep_original_mask=True)
    batch = collate([dataset[0], dataset[1]])
    assert batch["image"].shape == (2, 3, 8, 8) and batch["mask"].shape == (2, 8, 8)
    assert batch["index"].tolist() == [0, 1]
    assert batch["path"] == [str(samples[0][0]), str(samples[1][0])]
    assert [m.shape for m in batch["original_mask"]] == [(8, 12), (9, 7)]
    assert batch["original_mask"][1].dtype == torch.int64
    assert "original_mask" not in SegmentationDataset(samples, TINY, transform=EvalTransform((8, 8)))[0]


def test_without_transform_items_keep_the_original_size(tmp_path):
    samples = [(write_image(tmp_path / "a.png", size=(7, 9)), write_mask(tmp_path / "am.png", 1, size=(7, 9)))]
    item = SegmentationDataset(samples, TINY)[0]
    assert item["image"].shape == (3, 9, 7) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["mask"].shape == (9, 7) and item["mask"].dtype == torch.int64


def test_build_dataset_dispatch(tmp_path):
    root = make_voc_flat(tmp_path / "VOCSegmentation")
    assert build_dataset("voc", root, "val").info.name == "voc"
    with pytest.raises(ConfigError, match="coco"):
        build_dataset("coco", root, "val")

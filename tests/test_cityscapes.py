"""Cityscapes from generated files in the official layout: the label table, labelIds -> train ids, splits, file sets."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hummingbird_fungi.data.cityscapes import LABELS, train_id_map
from hummingbird_fungi.data.segmentation import build_dataset
from hummingbird_fungi.errors import DataError

# cityscapesScripts' labels.py: id -> trainId for the 19 evaluated classes, in train-id order.
OFFICIAL_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                      26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
OFFICIAL_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                  "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                  "bicycle")
LABEL_IDS = np.array([[7, 26, 0, 4, 33, 24, 255, 23]], dtype=np.uint8).repeat(4, axis=0)  # (4, 8) labelIds
TRAIN_IDS = np.array([[0, 13, 255, 255, 18, 11, 255, 10]]).repeat(4, axis=0)


def make_cityscapes(root: Path) -> Path:
    """leftImg8bit/ + gtFine/ with train cities aachen (2 frames) and bochum (1), val city frankfurt (1)."""
    frames = {"train": ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"],
              "val": ["frankfurt_000000_000294"]}
    for split, ids in frames.items():
        for i, sample_id in enumerate(ids):
            city = sample_id.split("_")[0]
            image = root / "leftImg8bit" / split / city / f"{sample_id}_leftImg8bit.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(i).integers(0, 256, (4, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(image)
            labels = root / "gtFine" / split / city / f"{sample_id}_gtFine_labelIds.png"
            labels.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(LABEL_IDS, mode="L").save(labels)
            Image.fromarray(np.zeros((4, 8, 3), np.uint8)).save(labels.with_name(f"{sample_id}_gtFine_color.png"))
    return root


def test_label_table_matches_the_official_train_ids():
    assert [label.id for label in LABELS] == list(range(34))
    assert {label.id: label.train_id for label in LABELS if label.train_id != 255} == OFFICIAL_TRAIN_IDS
    table = train_id_map()
    assert [int(table[i]) for i in range(34)] == [OFFICIAL_TRAIN_IDS.get(i, 255) for i in range(34)]
    assert (table[34:] == 255).all()
    names = {label.train_id: label.name for label in LABELS if label.train_id != 255}
    assert tuple(names[t] for t in range(19)) == OFFICIAL_NAMES


def test_cityscapes_dataset(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes")
    train = build_dataset("cityscapes", root, "train")
    assert train.ids == ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"]
    assert (train.info.num_classes, train.info.ignore_index, train.info.class_names) == (19, 255, OFFICIAL_NAMES)
    assert train.info.palette[0] == (128, 64, 128) and len(train.info.palette) == 19
    assert np.array_equal(train.load(2)[1], TRAIN_IDS)
    assert len(build_dataset("cityscapes", root, "trainval")) == 4
    bochum = write_ids(tmp_path, "bochum_000000_000313")
    assert build_dataset("cityscapes", root, "train", file_set=bochum).ids == ["bochum_000000_000313"]
    with pytest.raises(DataError, match="frankfurt_000000_000294"):
        build_dataset("cityscapes", root, "train", file_set=write_ids(tmp_path, "frankfurt_000000_000294"))
    (root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match="frankfurt_000000_000294_gtFine_labelIds.png"):
        build_dataset("cityscapes", root, "val")


def write_ids(folder: Path, *ids: str) -> Path:
    """An id-list file."""
    path = folder / "list.txt"
    path.write_text("\n".join(ids) + "\n")
    return path

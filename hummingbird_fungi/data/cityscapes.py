"""Cityscapes with fine annotations, scored on the 19 train ids of the official label table.

Layout: `<root>/leftImg8bit/<split>/<city>/<id>_leftImg8bit.png` and
`<root>/gtFine/<split>/<city>/<id>_gtFine_labelIds.png`, where `<id>` is `<city>_<sequence>_<frame>`
(the ids of file sets). Splits: train, val, test and trainval (train and val together). The raw
label ids are mapped to train ids; every other id becomes void (255), as in cityscapesScripts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from hummingbird_fungi.data.archives import DataPath
from hummingbird_fungi.data.segmentation import (
    SEGMENTATION_DATASETS,
    DatasetInfo,
    SegmentationDataset,
    existing_dir,
    restrict_ids,
)
from hummingbird_fungi.errors import DataError

log = logging.getLogger(__name__)

IGNORE = 255
IMAGE_SUFFIX = "_leftImg8bit"
MASK_SUFFIX = "_gtFine_labelIds.png"


class CityscapesLabel(NamedTuple):
    """One row of the official label table (cityscapesScripts `labels.py`)."""

    name: str
    id: int
    train_id: int  # 255: not evaluated
    color: tuple[int, int, int]


LABELS = (  # the 34 labels stored in *_labelIds.png (the table's 'license plate', id -1, is never stored)
    CityscapesLabel("unlabeled", 0, 255, (0, 0, 0)),
    CityscapesLabel("ego vehicle", 1, 255, (0, 0, 0)),
    CityscapesLabel("rectification border", 2, 255, (0, 0, 0)),
    CityscapesLabel("out of roi", 3, 255, (0, 0, 0)),
    CityscapesLabel("static", 4, 255, (0, 0, 0)),
    CityscapesLabel("dynamic", 5, 255, (111, 74, 0)),
    CityscapesLabel("ground", 6, 255, (81, 0, 81)),
    CityscapesLabel("road", 7, 0, (128, 64, 128)),
    CityscapesLabel("sidewalk", 8, 1, (244, 35, 232)),
    CityscapesLabel("parking", 9, 255, (250, 170, 160)),
    CityscapesLabel("rail track", 10, 255, (230, 150, 140)),
    CityscapesLabel("building", 11, 2, (70, 70, 70)),
    CityscapesLabel("wall", 12, 3, (102, 102, 156)),
    CityscapesLabel("fence", 13, 4, (190, 153, 153)),
    CityscapesLabel("guard rail", 14, 255, (180, 165, 180)),
    CityscapesLabel("bridge", 15, 255, (150, 100, 100)),
    CityscapesLabel("tunnel", 16, 255, (150, 120, 90)),
    CityscapesLabel("pole", 17, 5, (153, 153, 153)),
    CityscapesLabel("polegroup", 18, 255, (153, 153, 153)),
    CityscapesLabel("traffic light", 19, 6, (250, 170, 30)),
    CityscapesLabel("traffic sign", 20, 7, (220, 220, 0)),
    CityscapesLabel("vegetation", 21, 8, (107, 142, 35)),
    CityscapesLabel("terrain", 22, 9, (152, 251, 152)),
    CityscapesLabel("sky", 23, 10, (70, 130, 180)),
    CityscapesLabel("person", 24, 11, (220, 20, 60)),
    CityscapesLabel("rider", 25, 12, (255, 0, 0)),
    CityscapesLabel("car", 26, 13, (0, 0, 142)),
    CityscapesLabel("truck", 27, 14, (0, 0, 70)),
    CityscapesLabel("bus", 28, 15, (0, 60, 100)),
    CityscapesLabel("caravan", 29, 255, (0, 0, 90)),
    CityscapesLabel("trailer", 30, 255, (0, 0, 110)),
    CityscapesLabel("train", 31, 16, (0, 80, 100)),
    CityscapesLabel("motorcycle", 32, 17, (0, 0, 230)),
    CityscapesLabel("bicycle", 33, 18, (119, 11, 32)),
)


def train_id_map() -> np.ndarray:
    """(256,) int64 lookup from a labelIds value to its train id (255 for ids that are not evaluated)."""
    table = np.full(256, IGNORE, dtype=np.int64)
    for label in LABELS:
        table[label.id] = label.train_id
    return table


def _info() -> DatasetInfo:
    """The 19-class label space: train-id order, names and colours from the label table."""
    evaluated = sorted((label for label in LABELS if label.train_id != IGNORE), key=lambda label: label.train_id)
    return DatasetInfo("cityscapes", len(evaluated), IGNORE, tuple(label.name for label in evaluated), False,
                       tuple(label.color for label in evaluated))


def _split_samples(root: DataPath, split: str) -> dict[str, tuple[DataPath, DataPath]]:
    """id -> (image, labelIds mask) of one split; DataError naming an image without its mask."""
    images, masks = existing_dir(root / "leftImg8bit" / split, "Cityscapes image folder"), root / "gtFine" / split
    samples = {}
    for city in images.iterdir():
        if not city.is_dir():
            continue
        for image in city.glob(f"*{IMAGE_SUFFIX}.png"):
            sample_id = image.stem.removesuffix(IMAGE_SUFFIX)
            mask = masks / city.name / f"{sample_id}{MASK_SUFFIX}"
            if not mask.is_file():
                raise DataError(f"Cityscapes image {image} has no label file {mask}")
            samples[sample_id] = (image, mask)
    return samples


def cityscapes_dataset(root: str | Path, split: str, file_set: str | Path | None = None,
                       **kw: Any) -> SegmentationDataset:
    """Cityscapes fine annotations (19 train ids, void 255); split train, val, test or trainval."""
    root = existing_dir(root, "Cityscapes root")
    samples: dict[str, tuple[DataPath, DataPath]] = {}
    for part in ("train", "val") if split == "trainval" else (split,):
        samples.update(_split_samples(root, part))
    ids = restrict_ids(sorted(samples), file_set, f"Cityscapes split {split!r}")
    log.info("Cityscapes %s: %d images from %s", split, len(ids), root)
    return SegmentationDataset([samples[i] for i in ids], _info(), source=f"Cityscapes root {root} split {split!r}",
                               label_map=train_id_map(), id_suffix=IMAGE_SUFFIX, **kw)


SEGMENTATION_DATASETS.register("cityscapes")(cityscapes_dataset)

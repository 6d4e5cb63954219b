"""Any torch Dataset of (image, mask) pairs as a SegmentationDataset, for memory banks and evaluation from Python.

The wrapped dataset supplies decoded pairs; the label space (class count, ignore id, names, palette)
is given by the caller. The pairs then go through the same checks, transforms, seeded augmentation
and subsets as the built-in layouts:

    train = TorchSegmentationDataset(my_train_set, num_classes=19, ignore_index=255)
    results = evaluate(encoder, train, TorchSegmentationDataset(my_val_set, num_classes=19, ignore_index=255))
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from hummingbird_fungi.data.segmentation import Colour, DatasetInfo, SegmentationDataset
from hummingbird_fungi.data.transforms import to_rgb
from hummingbird_fungi.errors import ConfigError, DataError


class DatasetItem(NamedTuple):
    """A reference to item `index` of a wrapped dataset; its text is `dataset[index]`."""

    dataset: str
    index: int

    @property
    def stem(self) -> str:
        """The item's id in subsets."""
        return str(self)

    def __str__(self) -> str:
        return f"{self.dataset}[{self.index}]"


def as_image(value: Any, item: Any) -> Image.Image:
    """RGB PIL image of a PIL image, an (h, w[, 3]) array or a (3, h, w) tensor/array (uint8 or floats in [0, 1]);
    `item` names it in messages."""
    if isinstance(value, Image.Image):
        return to_rgb(value, str(item))
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)  # (C, h, w) -> (h, w, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise DataError(f"{item}: an image must be (h, w), (h, w, 3) or (3, h, w), got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (array.min() < 0 or array.max() > 1):
            raise DataError(f"{item}: float images must hold values in [0, 1] (not normalised), "
                            f"got [{array.min():.3g}, {array.max():.3g}]")
        array = np.round(array * 255)
    return to_rgb(Image.fromarray(array.astype(np.uint8)), str(item))


def as_mask(value: Any, item: Any) -> np.ndarray | None:
    """(h, w) int64 class ids from an integer array or tensor (a leading 1 is dropped) or a single-channel PIL
    image; `item` names it in messages."""
    if value is None:
        return None
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise DataError(f"{item}: a mask must be an (h, w) map of integer class ids, got {array.dtype} of shape "
                        f"{array.shape}")
    return array.astype(np.int64)


class TorchSegmentationDataset(SegmentationDataset):
    """The (image, mask) items of any indexable dataset (extra tuple entries are ignored), with a given label space."""

    def __init__(self, dataset: Any, num_classes: int, ignore_index: int | None = None,
                 class_names: Sequence[str] | None = None, name: str = "dataset",
                 palette: Sequence[Colour] | None = None, void_to_background: bool = False, **kw: Any) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
        names = tuple(class_names or (f"class_{i}" for i in range(num_classes)))
        if len(names) != num_classes:
            raise ConfigError(f"{len(names)} class names for num_classes={num_classes}")
        info = DatasetInfo(name, num_classes, ignore_index, names, void_to_background,
                           None if palette is None else tuple(palette))  # type: ignore[arg-type]
        items = [DatasetItem(name, i) for i in range(len(dataset))]
        super().__init__([(item, item) for item in items], info, source=f"dataset {name}", **kw)
        self.dataset = dataset

    def read_sample(self, index: int) -> tuple[Image.Image, np.ndarray | None]:
        """The wrapped item's image as RGB and its mask as (h, w) int64 class ids (through `label_map` if set)."""
        item = self.samples[index][0]
        image, mask = self.dataset[item.index][:2]
        mask = as_mask(mask, item)
        return as_image(image, item), None if mask is None else self.map_labels(mask, item)

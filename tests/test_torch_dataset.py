"""Any torch Dataset of (image, mask) pairs through the same checks, subsets and evaluation; dataset palettes."""

import numpy as np
import pytest
import torch
from PIL import Image

from hummingbird_fungi import MemoryOptions, build_dataset, evaluate
from hummingbird_fungi.data.custom import TorchSegmentationDataset
from hummingbird_fungi.data.segmentation import DatasetInfo, read_folder_info
from hummingbird_fungi.errors import ConfigError, DataError
from hummingbird_fungi.testing import tiny_timm_vit


class Pairs(torch.utils.data.Dataset):
    """The toy folder dataset's split as (image, mask) pairs in the forms users hand in."""

    def __init__(self, folder_set, form: str) -> None:
        self.folder_set, self.form = folder_set, form

    def __len__(self) -> int:
        return len(self.folder_set)

    def __getitem__(self, index: int):
        image, mask = self.folder_set.load(index)
        if self.form == "tensor":  # (3, h, w) floats in [0, 1] and a (1, h, w) tensor, plus an extra entry
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
            return pixels, torch.from_numpy(mask)[None], "extra"
        return image, Image.fromarray(mask.astype(np.uint8))


@pytest.mark.parametrize("form", ["tensor", "pil"])
def test_wrapped_pairs_equal_the_folder_samples(toy_dataset, form):
    folder = build_dataset("folder", toy_dataset, "train")
    wrapped = TorchSegmentationDataset(Pairs(folder, form), num_classes=folder.info.num_classes,
                                       ignore_index=folder.info.ignore_index, name="toy")
    assert len(wrapped) == len(folder) and wrapped.ids[0] == "toy[0]" and wrapped.info.class_names[0] == "class_0"
    for index in range(len(folder)):
        (image_a, mask_a), (image_b, mask_b) = folder.load(index), wrapped.load(index)
        assert np.array_equal(np.asarray(image_a), np.asarray(image_b)) and np.array_equal(mask_a, mask_b)
    part = wrapped.subset(0.5, seed=1)
    assert len(part) == 3 and np.array_equal(part.load(0)[1], wrapped.load(part.samples[0][0].index)[1])


def test_evaluate_takes_a_wrapped_dataset(toy_dataset):
    splits = {s: build_dataset("folder", toy_dataset, s) for s in ("train", "val")}
    wrapped = {s: TorchSegmentationDataset(Pairs(d, "tensor"), num_classes=d.info.num_classes,
                                           ignore_index=d.info.ignore_index) for s, d in splits.items()}
    options = {"input_size": 64, "memory": MemoryOptions(size=None, augment=False), "device": "cpu"}
    direct = evaluate(tiny_timm_vit(), splits["train"], splits["val"], **options)
    through = evaluate(tiny_timm_vit(), wrapped["train"], wrapped["val"], **options)
    assert through["miou"] == direct["miou"] and through["num_eval_images"] == 3


def test_wrapped_pairs_are_checked(toy_dataset):
    image = torch.rand(3, 4, 6)
    with pytest.raises(DataError, match=r"bad\[0\].*\[0, 1\]"):
        TorchSegmentationDataset([(image * 3, torch.zeros(4, 6, dtype=torch.long))], 2, name="bad").load(0)
    with pytest.raises(DataError, match=r"bad\[0\].*integer"):
        TorchSegmentationDataset([(image, torch.zeros(4, 6))], 2, name="bad").load(0)
    with pytest.raises(DataError, match=r"bad\[0\].*\[7\]"):
        TorchSegmentationDataset([(image, torch.full((4, 6), 7))], 2, ignore_index=255, name="bad").load(0)
    with pytest.raises(DataError, match=r"bad\[0\] is 5x4"):
        TorchSegmentationDataset([(image, torch.zeros(4, 5, dtype=torch.long))], 2, name="bad").load(0)
    with pytest.raises(ConfigError, match="3 class names"):
        TorchSegmentationDataset([(image, None)], 2, class_names=["a", "b", "c"])
    unlabelled = TorchSegmentationDataset([(image.numpy(), None)], 2)
    assert unlabelled.load(0)[1] is None and unlabelled.load(0)[0].size == (6, 4)


def test_palettes_are_validated(tmp_path):
    info = DatasetInfo("d", 2, None, ("a", "b"), False, [[0, 0, 0], np.array([255, 128, 1])])
    assert info.palette == ((0, 0, 0), (255, 128, 1))
    assert DatasetInfo("d", 2, None, ("a", "b"), False).palette is None
    for bad in ([[0, 0, 0]], [[0, 0, 0], [0, 0, 256]], [[0, 0, 0], [0, 0]], [[0, 0, 0], [0.5, 0, 0]]):
        with pytest.raises(DataError, match="palette"):
            DatasetInfo("d", 2, None, ("a", "b"), False, bad)
    (tmp_path / "dataset.yaml").write_text("classes: [a, b]\npalette: [[1, 2, 3]]\n")
    with pytest.raises(DataError, match=r"dataset\.yaml.*palette.*2 classes"):
        read_folder_info(tmp_path / "dataset.yaml")

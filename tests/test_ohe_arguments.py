"""`hbird_evaluation`'s arguments, each against its open-hummingbird-eval meaning: augmentation_epoch,
memory_size, dataset names and '*fraction', nn_method/nn_params, ignore_index, n_neighbours, file sets.

Expected values are written out here from the meanings (docs/protocol.md, open-hummingbird-eval's code),
not read from the tables in eval/hbird.py, so a wrong table entry fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import hummingbird_fungi.eval.hbird as hbird
from hummingbird_fungi import MemoryOptions, build_dataset, hbird_evaluation
from hummingbird_fungi.data.segmentation import SEGMENTATION_DATASETS
from hummingbird_fungi.errors import DataError
from hummingbird_fungi.memory.bank import MemoryBank
from hummingbird_fungi.retrieval.indexes import check_index_options
from hummingbird_fungi.testing import VOID, make_folder_dataset, tiny_timm_vit

E, PATCH = 32, 16
GRID = (64 // PATCH) ** 2  # 16 patches per 64x64 image
TRAIN, VAL = 6, 3  # images of the toy dataset (conftest.toy_dataset)
OHE = {"dataset_name": "folder", "input_size": 64, "batch_size": 3, "num_workers": 0, "nn_method": "torch",
       "n_neighbours": 5, "device": "cpu"}


def run(root, **kw):
    """hbird_evaluation of the tiny timm ViT on `root` -> (mIoU, details)."""
    return hbird_evaluation(tiny_timm_vit(), E, PATCH, data_dir=str(root), return_knn_details=True,
                            **{**OHE, **kw})


# --------------------------------------------------------------------------- augmentation_epoch, memory_size


def test_two_augmentation_epochs_fill_the_bank_from_two_augmented_passes(toy_dataset, tmp_path):
    """augmentation_epoch=2: every image is passed twice with fresh augmentations; the first pass is exactly the
    one-epoch bank (draws depend on (seed, epoch, image) only) and the second differs from it."""
    one = run(toy_dataset, augmentation_epoch=1, memory_size=None,
              memory=MemoryOptions(path=str(tmp_path / "one"), shard_images=4, dtype="float32"))[1]
    two = run(toy_dataset, augmentation_epoch=2, memory_size=None,
              memory=MemoryOptions(path=str(tmp_path / "two"), shard_images=4, dtype="float32"))[1]
    assert one["memory"]["rows"] == TRAIN * GRID and two["memory"]["rows"] == 2 * TRAIN * GRID
    bank = MemoryBank.load(tmp_path / "two")
    assert bank.manifest["spec"]["augmentation_epochs"] == 2 and bank.manifest["num_images"] == TRAIN
    assert [(s["epoch"], s["images"], s["rows"]) for s in bank.manifest["shards"]] == [
        (0, [0, 4], 4 * GRID), (0, [4, 6], 2 * GRID), (1, [0, 4], 4 * GRID), (1, [4, 6], 2 * GRID)]
    assert bank.row_images().tolist() == list(np.repeat(np.arange(TRAIN), GRID)) * 2
    feats = np.concatenate(bank.feature_blocks)
    first = np.concatenate(MemoryBank.load(tmp_path / "one").feature_blocks)
    assert np.array_equal(feats[:TRAIN * GRID], first)  # epoch 0 is the one-epoch bank
    assert not np.allclose(feats[TRAIN * GRID:], first, atol=1e-3)  # epoch 1: other crops and colours


@pytest.mark.parametrize("memory_size,epochs,per_image", [
    (48, 1, 8),  # 48 // (6 images x 1 epoch)
    (48, 2, 4),  # 48 // (6 x 2): the budget is shared by the epochs
    (40, 2, 3),  # 40 // 12 = 3: rounded down, 36 rows <= 40
    (1000, 1, GRID),  # more than every patch: all 16 kept
    (4, 2, 1),  # fewer than images x epochs: one patch per image and epoch
])
def test_an_integer_memory_size_bounds_the_rows(toy_dataset, tmp_path, memory_size, epochs, per_image):
    """memory_size: n_img = memory_size // (images x epochs) patches per image and epoch, clamped to [1, N], so
    the bank holds exactly n_img x images x epochs rows, each image contributing n_img per epoch."""
    path = tmp_path / "bank"
    details = run(toy_dataset, augmentation_epoch=epochs, memory_size=memory_size,
                  memory=MemoryOptions(path=str(path)))[1]
    rows = per_image * TRAIN * epochs
    assert details["memory"]["rows"] == rows and details["memory"]["patches_per_image"] == per_image
    assert details["memory"]["num_images"] == TRAIN
    bank = MemoryBank.load(path)
    assert bank.count == rows and bank.manifest["count"] == rows and bank.manifest["spec"]["size"] == memory_size
    assert torch.equal(bank.row_images().bincount(minlength=TRAIN), torch.full((TRAIN,), per_image * epochs))


# --------------------------------------------------------------------------- dataset_name, data_dir, file sets


class Recorder:
    """Stands in for build_dataset and evaluate inside eval.hbird: records what hbird_evaluation asks for and
    returns the toy dataset / a fixed result, so no VOC, ADE20K, ... files or model runs are needed."""

    def __init__(self, toy):
        self.toy, self.datasets, self.evaluated = toy, [], None

    def build_dataset(self, kind, root, split, file_set=None):
        self.datasets.append((kind, root, split, file_set))  # memory split first, then the evaluation split
        return build_dataset("folder", self.toy, "train" if len(self.datasets) % 2 else "val")

    def evaluate(self, encoder, train_data, eval_data, **kw):
        self.evaluated = {"train": train_data, "eval": eval_data, **kw}
        return {"miou_reference": 0.25, "miou": 0.5}


@pytest.fixture
def recorder(toy_dataset, monkeypatch):
    rec = Recorder(toy_dataset)
    monkeypatch.setattr(hbird, "build_dataset", rec.build_dataset)
    monkeypatch.setattr(hbird, "evaluate", rec.evaluate)
    return rec


# open-hummingbird-eval's dataset names -> (our kind, memory split, evaluation split), from its loaders:
# VOC trainaug/val, ADE20K training/validation, Cityscapes and COCO train/val
OHE_NAMES = [("voc", "voc", "trainaug", "val"), ("ade20k", "ade20k", "training", "validation"),
             ("cityscapes", "cityscapes", "train", "val"), ("coco-stuff", "coco_stuff", "train", "val"),
             ("coco-thing", "coco_things", "train", "val"), ("folder", "folder", "train", "val")]


@pytest.mark.parametrize("name,kind,memory_split,eval_split", OHE_NAMES)
def test_ohe_dataset_names_map_to_our_kinds_and_splits(recorder, name, kind, memory_split, eval_split):
    assert kind in SEGMENTATION_DATASETS.names()
    assert hbird_evaluation(tiny_timm_vit(), E, PATCH, dataset_name=name, data_dir="/data/x") == 0.25
    assert recorder.datasets == [(kind, "/data/x", memory_split, None), (kind, "/data/x", eval_split, None)]


def test_file_sets_and_split_overrides_reach_the_datasets(recorder):
    hbird_evaluation(tiny_timm_vit(), E, PATCH, dataset_name="voc", data_dir="/d", train_fs_path="/sets/t.txt",
                     val_fs_path="/sets/v.txt")
    assert recorder.datasets == [("voc", "/d", "trainaug", "/sets/t.txt"), ("voc", "/d", "val", "/sets/v.txt")]
    recorder.datasets.clear()
    hbird_evaluation(tiny_timm_vit(), E, PATCH, dataset_name="ade20k", data_dir="/d", train_split="train_small",
                     eval_split="val_small")
    assert [entry[2] for entry in recorder.datasets] == ["train_small", "val_small"]


def test_a_fraction_takes_a_seeded_part_of_the_memory_split_only(recorder, toy_dataset):
    """'folder*0.5': half of the memory images, drawn with the run seed (not the first half); evaluation on all."""
    all_ids = build_dataset("folder", toy_dataset, "train").ids
    chosen = {}
    for seed in range(6):
        hbird_evaluation(tiny_timm_vit(), E, PATCH, dataset_name="folder*0.5", data_dir="/d", seed=seed)
        train, evaluated = recorder.evaluated["train"], recorder.evaluated["eval"]
        assert len(train) == TRAIN // 2 and set(train.ids) < set(all_ids) and len(evaluated) == VAL
        assert train.ids == sorted(train.ids, key=all_ids.index)  # kept in dataset order
        assert recorder.evaluated["seed"] == seed
        chosen[seed] = tuple(train.ids)
        recorder.datasets.clear()
    hbird_evaluation(tiny_timm_vit(), E, PATCH, dataset_name="folder*0.5", data_dir="/d", seed=3)
    assert tuple(recorder.evaluated["train"].ids) == chosen[3]  # the same seed, the same half
    assert len(set(chosen.values())) > 1  # other seeds, other halves
    assert recorder.datasets[0][:3] == ("folder", "/d", "train")  # the name without '*0.5'
    hbird_evaluation(tiny_timm_vit(), E, PATCH, dataset_name="folder", data_dir="/d")
    assert len(recorder.evaluated["train"]) == TRAIN  # no fraction: every image


# --------------------------------------------------------------------------- nn_method, nn_params, n_neighbours


def test_scann_parameter_names_are_renamed_to_ours(recorder, monkeypatch):
    """With ScaNN installed (pretended here), open-hummingbird-eval's ScaNN parameter names become our scann
    backend's option names; the others pass unchanged, and n_neighbours is k."""
    real = hbird.importlib.util.find_spec
    monkeypatch.setattr(hbird.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "scann" else real(name, *a))
    params = {"num_reordering_candidates": 120, "anisotropic_quantization_threshold": 0.2,
              "dimensions_per_block": 2, "num_leaves": 64, "num_leaves_to_search": 16}
    hbird_evaluation(tiny_timm_vit(), E, PATCH, dataset_name="folder", data_dir="/d", nn_method="scann",
                     nn_params=params, n_neighbours=7)
    retrieval = recorder.evaluated["retrieval"]
    assert retrieval.backend == "scann" and retrieval.k == 7
    assert retrieval.options == {"reorder": 120, "aq_threshold": 0.2, "dims_per_block": 2, "num_leaves": 64,
                                 "num_leaves_to_search": 16}
    check_index_options("scann", retrieval.options)  # every renamed key is an option of our scann index


def test_scann_without_the_package_falls_back_to_exact_search(recorder, monkeypatch, caplog):
    real = hbird.importlib.util.find_spec
    monkeypatch.setattr(hbird.importlib.util, "find_spec",
                        lambda name, *a: None if name == "scann" else real(name, *a))
    hbird_evaluation(tiny_timm_vit(), E, PATCH, dataset_name="folder", data_dir="/d",
                     nn_params={"num_reordering_candidates": 120})
    retrieval = recorder.evaluated["retrieval"]
    assert (retrieval.backend, retrieval.options, retrieval.k) == ("torch", {}, 30)  # OHE's default k
    assert "ScaNN is not installed" in caplog.text


def test_other_backends_take_their_parameters_unchanged(recorder):
    hbird_evaluation(tiny_timm_vit(), E, PATCH, dataset_name="folder", data_dir="/d", nn_method="faiss_ivfpq",
                     nn_params={"nlist": 8, "nprobe": 4})
    retrieval = recorder.evaluated["retrieval"]
    assert (retrieval.backend, retrieval.options) == ("faiss_ivfpq", {"nlist": 8, "nprobe": 4})


def test_memory_and_batch_arguments_reach_the_options(recorder):
    hbird_evaluation(tiny_timm_vit(), E, PATCH, dataset_name="folder", data_dir="/d", augmentation_epoch=3,
                     memory_size=500, batch_size=5, num_workers=1, input_size=96,
                     memory=MemoryOptions(shard_images=7, augment=False))
    ev = recorder.evaluated
    assert (ev["memory"].size, ev["memory"].augmentation_epochs) == (500, 3)
    assert (ev["memory"].shard_images, ev["memory"].augment) == (7, False)  # the rest of memory= is kept
    assert (ev["data"].batch_size, ev["data"].num_workers, ev["input_size"]) == (5, 1, 96)


# --------------------------------------------------------------------------- ignore_index


def void_as(root, value):
    """The toy dataset with its validation masks' void pixels (id VOID) rewritten as `value`."""
    for mask in (root / "annotations" / "val").glob("*.png"):
        ids = np.asarray(Image.open(mask)).copy()
        assert (ids == VOID).any()
        ids[ids == VOID] = value
        Image.fromarray(ids).save(mask)
    return root


def test_ignore_index_names_the_void_id_of_the_evaluation_masks(toy_dataset, tmp_path):
    """ignore_index=200 for masks whose void is 200 (the dataset describes 3): those pixels are not scored, so
    the evaluation equals the one where they are the described void; without it the masks are refused."""
    reference = run(toy_dataset, memory_size=None)[1]
    other = void_as(make_folder_dataset(tmp_path / "void200"), 200)
    with pytest.raises(DataError, match=r"\[200\]"):
        run(other, memory_size=None)
    details = run(other, memory_size=None, ignore_index=200)[1]
    assert details["miou"] == reference["miou"] and details["per_class_iou"] == reference["per_class_iou"]
    assert details["miou_reference"] == reference["miou_reference"]
    assert details["pixel_accuracy"] == reference["pixel_accuracy"]


def test_an_ignore_index_inside_the_label_space_drops_that_class(tmp_path):
    """ignore_index=2 (masks without another void id): the car pixels of the evaluation masks are not scored
    (its IoU is left out), unlike a run that scores them."""
    root = void_as(make_folder_dataset(tmp_path / "novoid"), 0)
    scored = run(root, memory_size=None)[1]
    dropped = run(root, memory_size=None, ignore_index=2)[1]
    assert scored["per_class_iou"]["car"] is not None and dropped["per_class_iou"]["car"] is None
    kept = [dropped["per_class_iou"][name] for name in ("sky", "road")]
    assert dropped["miou"] == pytest.approx(np.mean(kept))
    assert dropped["pixel_accuracy"] != scored["pixel_accuracy"]  # fewer pixels counted

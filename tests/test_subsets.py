"""Seeded subsets: the rounding rule, seeds, nesting of the 1/8, 1/64, 1/128 file sets, and the config keys."""

import math

import pytest

from hummingbird_fungi.config.loader import load_config
from hummingbird_fungi.config.schema import HbirdConfig, KnnConfig
from hummingbird_fungi.data.segmentation import build_dataset, voc_dataset
from hummingbird_fungi.data.subsets import (
    fraction_file_sets,
    random_subset,
    subset_count,
    write_fraction_file_sets,
)
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.eval.hbird import config_dataset
from hummingbird_fungi.eval.knn_run import load_split
from test_datasets import make_voc_flat

VOC_TRAINAUG = [f"2008_{i:06d}" for i in range(10582)]  # as many ids as VOC trainaug


def test_rounding_rule_is_exact():
    for total in range(1, 300):
        for fraction in (1 / 8, 1 / 64, 1 / 128, 0.3, 0.5, 0.999):
            assert subset_count(fraction, total) == max(1, math.floor(fraction * total + 0.5))
        assert subset_count(40, total) == min(40, total)
    assert [subset_count(1 / d, 10582) for d in (8, 64, 128)] == [1323, 165, 83]
    assert [subset_count(1 / d, 20210) for d in (8, 64, 128)] == [2526, 316, 158]
    assert subset_count(0.5, 5) == 3 and subset_count(0.1, 4) == 1  # half up; never empty
    for bad in (0, -3, 0.0, 1.0, 1.5, True):
        with pytest.raises(ConfigError):
            subset_count(bad, 10)


def test_same_seed_same_ids_other_seed_other_ids():
    ids = [f"img_{i:04d}" for i in range(500)]
    first = random_subset(ids, 0.1, seed=3)
    assert list(first) == list(random_subset(ids, 0.1, seed=3)) == sorted(first) and len(first) == 50
    draws = {tuple(random_subset(ids, 0.1, seed)) for seed in range(5)}
    assert len(draws) == 5
    chosen = {ids[i] for i in first}
    survivors = [i for i in ids if i in chosen or i.endswith("7")]  # drop unchosen ids: the choice stays
    assert {survivors[i] for i in random_subset(survivors, 50, seed=3)} == chosen


def test_fraction_file_sets_are_nested_and_written_like_the_reference(tmp_path):
    for seed in (0, 42):
        sets = fraction_file_sets(VOC_TRAINAUG, seed)
        assert [len(sets[d]) for d in (8, 64, 128)] == [1323, 165, 83]
        assert set(sets[128]) <= set(sets[64]) <= set(sets[8])
    files = write_fraction_file_sets(VOC_TRAINAUG[:64], "trainaug", tmp_path, seeds=[42, 783])
    assert len(files) == 6 and files[0] == tmp_path / "1_div_8" / "trainaug_8_42.txt"
    assert files[0].read_text().split() == fraction_file_sets(VOC_TRAINAUG[:64], 42)[8]


def test_a_file_set_equals_the_same_subset_of_the_split(tmp_path):
    root = make_voc_flat(tmp_path / "voc")
    (root / "sets" / "trainaug.txt").write_text("\n".join(f"{i:02d}" for i in range(40)))
    for i in range(40):  # the flat layout needs an image and a mask per id
        for folder, ext in (("images", "jpg"), ("SegmentationClassAug", "png")):
            (root / folder / f"{i:02d}.{ext}").write_bytes((root / folder / f"a.{ext}").read_bytes())
    dataset = voc_dataset(root, "trainaug")
    written = write_fraction_file_sets(dataset.ids, "trainaug", tmp_path / "sets", seeds=[7])
    from_file = voc_dataset(root, "trainaug", file_set=written[0])
    assert from_file.ids == dataset.subset(1 / 8, 7).ids and len(from_file) == 5


def test_config_keys_select_seeded_subsets(toy_dataset):
    def dataset(which, *overrides):
        config = load_config(None, [f"data.root={toy_dataset}", "data.kind=folder", "data.train_split=train",
                                    *overrides], schema=HbirdConfig)
        return config_dataset(config, which).ids

    assert len(dataset("train")) == 6 and len(dataset("train", "data.subset=0.5")) == 3
    assert len(dataset("eval", "data.eval_subset=2")) == 2 and len(dataset("train", "data.eval_subset=2")) == 6
    assert dataset("train", "data.subset=3") == dataset("train", "data.subset=3", "data.subset_seed=0")
    assert dataset("train", "data.subset=3", "seed=5") == dataset("train", "data.subset=3", "data.subset_seed=5")
    picks = {tuple(dataset("train", "data.subset=3", f"data.subset_seed={s}")) for s in range(6)}
    assert len(picks) > 1
    assert build_dataset("folder", toy_dataset, "train").subset(3, 0).ids == dataset("train", "data.subset=3")
    for bad in ("data.subset=1.5", "data.subset=0", "data.eval_subset=-2", "data.subset=1.0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad], schema=HbirdConfig)
    with pytest.raises(ConfigError, match="max_train_images"):
        load_config(None, ["data.max_train_images=5"], schema=HbirdConfig)


def test_knn_splits_use_the_same_rule():
    config = load_config(None, ["data.subset=0.1", "data.eval_subset=20", "data.subset_seed=4"], schema=KnnConfig)
    train, test = load_split(config, "train"), load_split(config, "eval")
    full = load_split(load_config(None, [], schema=KnnConfig), "train")
    assert len(train) == subset_count(0.1, len(full)) and len(test) == 20
    assert train.files == [full.files[i] for i in random_subset(full.ids, 0.1, 4)]

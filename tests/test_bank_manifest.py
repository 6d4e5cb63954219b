"""A saved bank's manifest fields are checked against each other and against the shard headers when it is read,
before any model loads: class names and palette vs num_classes, shard columns vs features.dim and num_classes,
count vs the shards' rows. Each problem is a DataError naming the file."""

import json
import shutil
from pathlib import Path

import pytest

from hummingbird_fungi.config.schema import FeatureOptions
from hummingbird_fungi.cli.main import main
from hummingbird_fungi.errors import DataError
from hummingbird_fungi.memory.bank import MemoryBank, manifest_json, read_manifest
from hummingbird_fungi.segment.segmenter import InContextSegmenter
from test_output_links import write_pairs
from test_segmenter import CLI_MODEL, TINY

PALETTE = [[30, 60, 200], [220, 40, 30], [40, 170, 60]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path]:
    """(a bank saved from three toy examples with class names and a palette, a folder of queries with masks)."""
    root = tmp_path_factory.mktemp("bank")
    examples = write_pairs(root / "ex", [(40, 56, 0.3), (48, 64, 0.5), (40, 48, 0.7)], "e")
    queries = write_pairs(root / "val", [(36, 52, 0.4)], "v")
    images = sorted((examples / "images").iterdir())
    segmenter = InContextSegmenter.from_examples(
        images, [examples / "masks" / p.name for p in images], backbone="vit_tiny_patch16_224", pretrained=False,
        backbone_kwargs=TINY, input_size=(64, 96), device="cpu", class_names=["left", "right", "band"],
        palette=PALETTE, features=FeatureOptions())  # raw embeddings: 192 columns
    return segmenter.save(root / "bank"), queries


def edited(bank: Path, folder: Path, **changes) -> Path:
    """A copy of `bank` in `folder` whose manifest has `changes` (dotted keys as a__b)."""
    copy = shutil.copytree(bank, folder / "bank")
    manifest = json.loads((copy / "manifest.json").read_text())
    for key, value in changes.items():
        *parents, last = key.split("__")
        target = manifest
        for name in parents:
            target = target[name]
        target[last] = value
    (copy / "manifest.json").write_bytes(manifest_json(manifest))
    return copy


@pytest.mark.parametrize("changes, named", [
    ({"class_names": ["left", "right"]}, ["manifest.json", "class_names", "num_classes=3"]),
    ({"palette": PALETTE[:2]}, ["manifest.json", "palette"]),
    ({"num_classes": 4, "class_names": ["a", "b", "c", "d"], "palette": None},
     ["00000.labels.npy", "3 columns", "num_classes=4"]),
    ({"features__dim": 7}, ["00000.features.npy", "192 columns", "features.dim=7"]),
    ({"count": 5}, ["manifest.json", "count=5", "288 rows"]),
    ({"num_classes": "3"}, ["manifest.json", "num_classes='3'"]),
], ids=["class names", "palette", "label columns", "feature columns", "count", "num_classes type"])
def test_inconsistent_manifest_is_refused_naming_the_file(saved, tmp_path, changes, named):
    bank = edited(saved[0], tmp_path, **changes)
    for read in (read_manifest, MemoryBank.load):
        with pytest.raises(DataError) as error:
            read(bank)
        for part in named:
            assert part in str(error.value), (part, str(error.value))
    assert MemoryBank.load(saved[0]).count == 288  # the untouched bank: 3 examples x 8 x 12 patches


def test_segment_refuses_short_class_names_before_the_model_loads(saved, tmp_path, monkeypatch, capsys):
    """It used to segment every image, then crash (exit 1) computing the metrics, with no summary."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bank was checked")

    monkeypatch.setattr("hummingbird_fungi.segment.segmenter.create_encoder", refuse)
    bank = edited(saved[0], tmp_path, class_names=["left", "right"])
    queries = saved[1]
    out = tmp_path / "out"
    assert main(["segment", "--memory", str(bank), "--images", str(queries / "images"), "--ground-truth",
                 str(queries / "masks"), "--out", str(out), *CLI_MODEL]) == 2
    err = capsys.readouterr().err
    assert str(bank / "manifest.json") in err and "class_names" in err and not out.exists()

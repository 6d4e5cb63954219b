"""The command line a new user meets: help, presets by name, inputs checked first, outputs people can read."""

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import hummingbird_fungi.models.backbones as backbones
from hummingbird_fungi import __version__
from hummingbird_fungi.cli.main import main
from hummingbird_fungi.config.loader import load_config, presets
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.testing import make_folder_dataset

TINY_MODEL = ["model.name=vit_tiny_patch16_224", "model.input_size=64", "data.kind=folder", "data.train_split=train",
              "data.eval_split=val", "data.num_workers=0", "memory.size=null", "retrieval.k=5"]


def test_help_is_instant_and_lists_keys_with_an_example():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "hummingbird_fungi", "hbird", "--help"], capture_output=True,
                         text=True, env=env, check=True).stdout
    assert time.perf_counter() - start < 20  # a generous bound: torch is not imported to print help
    assert "memory.size" in out and "retrieval.k" in out and "features.fungi.layer" in out
    assert "example:" in out and "--config camvid_dinov2_vits14" in out
    probe = "import sys, hummingbird_fungi.cli.main as m; m.build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"hbfungi {__version__}"


def test_presets_by_name_from_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # outside the checkout: presets ship inside the package
    assert "camvid_dinov2_vits14" in presets() and "knn_digits_dinov2_vits14" in presets()
    assert load_config("camvid_dinov2_vits14").model.input_size == (336, 448)
    assert main(["configs"]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"^camvid_dinov2_vits14 +CamVid train -> val", listing, re.M)
    assert len(listing.splitlines()) == len(presets())
    assert main(["config", "show", "camvid_dinov2_vits14", "retrieval.k=7"]) == 0
    shown = capsys.readouterr().out
    assert "retrieval.k: 7" in shown and "# neighbours per patch" in shown and "model.input_size: [336, 448]" in shown
    assert main(["config", "show", "knn_digits_dinov2_vits14"]) == 0
    assert "knn.k: 20" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="camvid_dinov2_vits14"):
        load_config("camvid_dinov2_vitz14")  # a near miss is named


def test_logging_shows_the_toolkit_and_hides_library_info(tmp_path):
    make_folder_dataset(tmp_path / "toy")
    main(["build-memory", *TINY_MODEL, "model.pretrained=false", f"data.root={tmp_path / 'toy'}",
          f"memory.path={tmp_path / 'bank'}"])
    assert logging.getLogger("hummingbird_fungi.memory.build").isEnabledFor(logging.INFO)
    assert not logging.getLogger("faiss.loader").isEnabledFor(logging.INFO)


@pytest.fixture
def weights_file(tmp_path) -> Path:
    """A random vit_tiny_patch16_224 state dict saved as a local checkpoint."""
    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    return path


def test_build_memory_bank_segments_without_naming_the_weights_again(tmp_path, weights_file):
    root = make_folder_dataset(tmp_path / "toy")
    bank = tmp_path / "bank"
    assert main(["build-memory", *TINY_MODEL, f"model.weights={weights_file}", f"data.root={root}",
                 f"memory.path={bank}", "data.normalize=imagenet"]) == 0
    out = tmp_path / "out"
    assert main(["segment", "--memory", str(bank), "--images", str(root / "images" / "val"), "--out", str(out),
                 "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["segmenter"]["weights"] == str(weights_file) and summary["segment"]["num_segmented"] == 3


def test_images_as_folder_file_or_glob_checked_before_the_model(tmp_path, monkeypatch, capsys):
    root = make_folder_dataset(tmp_path / "toy")
    examples = root  # the folder-dataset layout: images/train + annotations/train + dataset.yaml
    model = ["--backbone", "vit_tiny_patch16_224", "--random-init", "--input-size", "64x64", "--device", "cpu"]
    val = root / "images" / "val"
    for images, count in ((str(val), 3), (str(val / "val001.png"), 1), (str(val / "val00[12].png"), 2)):
        out = tmp_path / f"out{count}"
        assert main(["segment", "--examples", str(examples), "--images", images, "--out", str(out), *model]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["segment"]["num_segmented"] == count
        assert summary["segmenter"]["class_names"] == ["sky", "road", "car"]  # dataset.yaml of the examples
        mask = Image.open(out / "masks" / "val001.png")
        assert mask.mode == "P" and set(np.unique(np.array(mask))) <= {0, 1, 2}  # palette PNG, raw ids
        assert Image.open(out / "overlays" / "val001.png").height > 64  # the legend strip below the image

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(backbones, "load_backbone", no_model)
    for bad in (str(val / "nope*.png"), str(tmp_path / "missing"), str(val / "missing.png")):
        assert main(["segment", "--examples", str(examples), "--images", bad, "--out", str(tmp_path / "x"),
                     *model]) == 2
        assert bad.split("/")[-1] in capsys.readouterr().err

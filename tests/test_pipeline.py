"""End to end on a generated dataset with a tiny random ViT: CLI, reproducibility, backends, bad input."""

import json

import numpy as np
from PIL import Image

from hummingbird_fungi.cli.main import main
from hummingbird_fungi.config.loader import load_config
from hummingbird_fungi.eval.hbird import run_hbird

TINY = ["model.name=vit_tiny_patch16_224", "model.pretrained=false", "model.input_size=[64,64]",
        "data.kind=folder", "data.train_split=train", "data.eval_split=val", "data.num_workers=0",
        "memory.size=40", "memory.shard_images=2", "retrieval.k=5", "transfer.temperature=0.1"]


def config(root, *extra):
    return load_config(None, TINY + [f"data.root={root}", *extra])


def corrupt(image):
    """Overwrite an image file with bytes no decoder reads; its original bytes."""
    good = image.read_bytes()
    image.write_bytes(b"not a png")
    return good


def test_hbird_is_reproducible_and_exact_backends_agree(toy_dataset):
    first = run_hbird(config(toy_dataset, "seed=3"))
    again = run_hbird(config(toy_dataset, "seed=3"))
    faiss = run_hbird(config(toy_dataset, "seed=3", "retrieval.backend=faiss"))
    assert first["miou"] == again["miou"] == faiss["miou"]
    assert first["per_class_iou"] == faiss["per_class_iou"]
    assert set(first["per_class_iou"]) == {"sky", "road", "car"}
    assert first["memory"]["rows"] == 36  # n_img = 40 // 6 = 6 per image
    assert 0.0 <= first["miou"] <= 1.0 and "miou_reference" in first and "evaluate_s" in first["timings"]
    other = run_hbird(config(toy_dataset, "seed=4"))
    assert other["memory"]["rows"] == 36


def test_original_resolution_evaluation(toy_dataset):
    result = run_hbird(config(toy_dataset, "data.eval_resolution=original", "model.input_size=[32,48]"))
    assert 0.0 <= result["miou"] <= 1.0


def test_cli_build_then_evaluate_and_refuse_other_features(toy_dataset, tmp_path, capsys):
    bank = tmp_path / "bank"
    args = ["--out", str(tmp_path / "build.json"), *TINY, f"data.root={toy_dataset}", f"memory.path={bank}"]
    assert main(["build-memory", *args]) == 0
    assert (bank / "manifest.json").exists()
    assert main(["evaluate", "--out", str(tmp_path / "eval.json"), *TINY, f"data.root={toy_dataset}",
                 f"memory.path={bank}"]) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert {"miou", "miou_reference", "per_class_iou", "config", "timings"} <= set(results)
    assert "mIoU" in capsys.readouterr().out
    code = main(["evaluate", *TINY, f"data.root={toy_dataset}", f"memory.path={bank}",
                 "model.name=vit_small_patch16_224"])
    assert code == 2 and "different features" in capsys.readouterr().err


def test_bad_inputs_name_the_culprit_and_keep_finished_shards(toy_dataset, tmp_path, capsys):
    bank = tmp_path / "bank"
    args = [*TINY, f"data.root={toy_dataset}", f"memory.path={bank}"]
    bad = toy_dataset / "images" / "train" / "train004.png"
    good = corrupt(bad)
    assert main(["build-memory", *args]) == 2
    assert "train004.png" in capsys.readouterr().err
    shards = sorted((tmp_path / "bank.partial" / "shards").glob("*.npy"))
    assert len(shards) == 4  # images 0-1 and 2-3 finished before the corrupt one
    before = {p.name: p.read_bytes() for p in shards}
    bad.write_bytes(good)
    assert main(["build-memory", *args]) == 0
    for name, data in before.items():
        assert (bank / "shards" / name).read_bytes() == data

    mask = toy_dataset / "annotations" / "val" / "val001.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(mask)
    assert main(["evaluate", *args]) == 2
    assert "val001.png" in capsys.readouterr().err
    Image.fromarray(np.full((64, 64), 9, np.uint8)).save(mask)
    assert main(["evaluate", *args]) == 2
    err = capsys.readouterr().err
    assert "val001.png" in err and "9" in err

    assert main(["hbird", *TINY, f"data.root={tmp_path / 'missing'}"]) == 2
    assert "missing" in capsys.readouterr().err
    (toy_dataset / "images" / "empty").mkdir()
    (toy_dataset / "annotations" / "empty").mkdir()
    assert main(["hbird", *TINY, f"data.root={toy_dataset}", "data.train_split=empty"]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["hbird", *TINY, f"data.root={toy_dataset}", "memory.sise=3"]) == 2
    assert "memory.sise" in capsys.readouterr().err


def test_fungi_features_run_end_to_end_with_support_negatives(toy_dataset):
    plain = run_hbird(config(toy_dataset, "features.kind=fungi"))
    support = run_hbird(config(toy_dataset, "features.kind=fungi", "features.fungi.negatives=support",
                               "features.support.size=60"))
    options = support["features"]["options"]
    assert options["negatives"] == "support" and options["exclude_same_image"] is True
    assert support["features"]["dim"] == plain["features"]["dim"] == 2 * 192
    assert support["memory"]["rows"] == plain["memory"]["rows"] == 36
    assert "support_bank_s" in support["timings"] and 0.0 <= support["miou"] <= 1.0

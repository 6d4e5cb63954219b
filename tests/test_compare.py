"""`hbird --per-image` and `hbfungi compare`: per-image matrices that sum to the run's, paired intervals by key."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hummingbird_fungi.cli.main import main
from hummingbird_fungi.errors import DataError
from hummingbird_fungi.eval.bootstrap import compare_runs, dataset_miou, paired_bootstrap, resample_indices

MODEL = ["model.name=vit_tiny_patch16_224", "model.pretrained=false", "model.input_size=64", "device=cpu",
         "data.num_workers=0", "data.kind=folder", "data.train_split=train", "memory.size=null"]


def test_per_image_matrices_sum_to_the_run_and_compare_prints_intervals(toy_dataset, tmp_path, capsys):
    runs = {}
    for name, extra in (("plain", []), ("whitened", ["features.transform.pca=true"])):
        out, per_image = tmp_path / f"{name}.json", tmp_path / f"{name}.npz"
        assert main(["hbird", "--out", str(out), "--per-image", str(per_image), f"data.root={toy_dataset}",
                     *MODEL, *extra]) == 0
        results = json.loads(out.read_text())
        with np.load(per_image) as data:
            keys, matrices = data["keys"], data["confusions"]
        assert results["per_image"] == str(per_image) and len(keys) == results["num_eval_images"] == 3
        assert dataset_miou(matrices.sum(0)) == pytest.approx(results["miou"])
        runs[name] = per_image
    capsys.readouterr()
    assert main(["compare", str(runs["plain"]), str(runs["whitened"]), "--resamples", "50",
                 "--out", str(tmp_path / "cmp.json")]) == 0
    printed = capsys.readouterr().out
    assert "whitened" in printed and "interval (vs plain)" in printed
    assert json.loads((tmp_path / "cmp.json").read_text())["rows"][1]["run"] == "whitened"


def test_compare_matches_images_by_key_and_refuses_other_images():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 50, (6, 3, 3))
    b = rng.integers(0, 50, (6, 3, 3))
    keys = np.array([f"img{i}" for i in range(6)])
    order = np.array([3, 0, 5, 1, 4, 2])
    rows = compare_runs({"a": (keys, a), "b": (keys[order], b[order])}, n_resamples=100, seed=1)
    direct = paired_bootstrap(a, b, indices=resample_indices(6, 100, 1))
    assert rows[1]["difference"] == pytest.approx(direct["difference"])
    assert (rows[1]["low"], rows[1]["high"]) == pytest.approx((direct["low"], direct["high"]))
    with pytest.raises(DataError, match="other images"):
        compare_runs({"a": (keys, a), "c": (np.array([f"x{i}" for i in range(6)]), b)})


def test_per_image_and_out_must_differ(toy_dataset, tmp_path, capsys):
    same = tmp_path / "r.json"
    assert main(["hbird", "--out", str(same), "--per-image", str(same), f"data.root={toy_dataset}", *MODEL]) == 2
    assert "same file" in capsys.readouterr().err

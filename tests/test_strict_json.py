"""Every JSON file the toolkit writes parses with a strict parser (no NaN, no Infinity), even where a metric has
nothing to measure: a build-memory run (an interrupted one too), an evaluation whose ground truth is all void,
a segment run with void ground truth and an unreadable image, and the manifests of saved banks."""

from pathlib import Path

import numpy as np
from PIL import Image

from hummingbird_fungi.cli.main import main
from hummingbird_fungi.memory.bank import partial_path
from hummingbird_fungi.testing import VOID
from test_faults import segment, strict_json, write_pairs
from test_pipeline import TINY, corrupt


def test_every_json_written_is_strict(toy_dataset, tmp_path, capsys):
    bank = tmp_path / "bank"
    run = [*TINY, f"data.root={toy_dataset}", f"memory.path={bank}"]
    bad = toy_dataset / "images" / "train" / "train004.png"
    good = corrupt(bad)
    assert main(["build-memory", *run]) == 2  # leaves an unfinished build: its manifest and shard records
    unfinished = sorted(partial_path(bank).rglob("*.json"))
    assert len(unfinished) == 3  # the manifest and the records of shards 0 and 1
    for file in unfinished:
        strict_json(file)
    bad.write_bytes(good)
    assert main(["build-memory", "--out", str(tmp_path / "build.json"), *run]) == 0

    for mask in (toy_dataset / "annotations" / "val").iterdir():
        Image.fromarray(np.full((64, 64), VOID, np.uint8)).save(mask)
    assert main(["evaluate", "--out", str(tmp_path / "results.json"), *run]) == 0
    assert "mIoU n/a" in capsys.readouterr().out
    results = strict_json(tmp_path / "results.json")
    assert results["miou"] is None and results["miou_reference"] is None and results["pixel_accuracy"] is None

    examples = write_pairs(tmp_path / "ex", [(40, 56, 0.3), (48, 64, 0.5)])
    val = write_pairs(tmp_path / "val", [(36, 52, 0.4), (44, 60, 0.6)], prefix="v")
    Image.fromarray(np.full((36, 52), 255, np.uint8)).save(val / "masks" / "v0.png")  # this image is all void
    (val / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "seg"
    assert segment("--examples", examples, "--images", val / "images", "--ground-truth", val / "masks",
                   "--out", out, "--save-memory", tmp_path / "saved") == 0
    summary = strict_json(out / "summary.json")
    accuracy = {Path(r["file"]).name: r.get("pixel_accuracy") for r in summary["segment"]["images"]}
    assert accuracy["v0.png"] is None and 0 <= accuracy["v1.png"] <= 1
    written = [tmp_path / "build.json", bank / "manifest.json", tmp_path / "saved" / "manifest.json"]
    for file in written:
        strict_json(file)
    assert not list(tmp_path.rglob(".*.tmp-*"))

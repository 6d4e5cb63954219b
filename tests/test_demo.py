"""The README's main command, `hbfungi demo` (what `./run.sh demo` runs), end to end with its defaults."""

from __future__ import annotations

import json

from hummingbird_fungi.cli.main import main


def test_demo_writes_masks_overlays_metrics_and_the_memory_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr("hummingbird_fungi.models.backbones.hub_weights_cached", lambda name: False)  # offline
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    images = summary["segment"]["images"]
    assert summary["segment"]["num_segmented"] == summary["segment"]["num_images"] == len(images) > 0
    for record in images:
        assert (out / record["mask"]).is_file() and (out / record["overlay"]).is_file()
    assert (out / "grid.png").is_file() and (out / "miou_vs_memory.png").is_file()
    assert 0.3 < summary["metrics"]["miou"] <= 1  # random weights still separate the synthetic classes
    sweep = summary["memory_sweep"]
    assert [point["rows"] for point in sweep] == sorted(point["rows"] for point in sweep)
    assert sweep[-1]["miou"] == summary["metrics"]["miou"]
    assert any("WEIGHTS ARE RANDOM" in note for note in summary["notes"])


def test_demo_never_writes_its_synthetic_data_through_a_planted_link(tmp_path):
    outside = tmp_path / "outside"
    (outside / "examples").mkdir(parents=True)
    kept = outside / "examples" / "dataset.yaml"
    kept.write_text("mine")
    out = tmp_path / "demo"
    out.mkdir()
    (out / "data").symlink_to(outside, target_is_directory=True)
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 2
    assert kept.read_text() == "mine" and sorted(p.name for p in outside.rglob("*")) == ["dataset.yaml", "examples"]

"""Hostile and careless input on the command line (issue 12): every case exits with code 2 and a message
naming the file or value, no input file changes, and nothing garbage is reported as success."""

import hashlib
import json
import os
import resource
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from hummingbird_fungi.cli.main import main
from hummingbird_fungi.config.schema import RetrievalOptions
from hummingbird_fungi.errors import DataError
from hummingbird_fungi.memory.bank import FORMAT_VERSION, manifest_json
from hummingbird_fungi.segment.segmenter import InContextSegmenter
from test_pipeline import TINY, corrupt
from test_segmenter import CLI_MODEL, toy_scene


def digest(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under `roots` (files or folders), by path."""
    files = [p for root in roots for p in ([root] if root.is_file() else sorted(root.rglob("*"))) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def strict_json(path: Path) -> dict:
    """Parse a JSON file, refusing NaN and Infinity."""
    def refuse(name: str) -> None:
        raise ValueError(f"{path} holds {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def write_pairs(folder: Path, scenes: list[tuple[int, int, float]], mask_dir: str | None = "masks",
                prefix: str = "e") -> Path:
    """`folder/images/<prefix>i.png` (and `folder/<mask_dir>/<prefix>i.png`) of toy scenes."""
    (folder / "images").mkdir(parents=True)
    if mask_dir:
        (folder / mask_dir).mkdir()
    for i, (height, width, split) in enumerate(scenes):
        image, mask = toy_scene(height, width, split)
        Image.fromarray(image).save(folder / "images" / f"{prefix}{i}.png")
        if mask_dir:
            Image.fromarray(mask).save(folder / mask_dir / f"{prefix}{i}.png")
    return folder


@pytest.fixture
def examples(tmp_path) -> Path:
    """images/ + masks/ of three toy scenes."""
    return write_pairs(tmp_path / "ex", [(40, 56, 0.3), (48, 64, 0.5), (40, 48, 0.7)])


@pytest.fixture
def val(tmp_path) -> Path:
    """images/ + masks/ (the ground truth) of two query scenes."""
    return write_pairs(tmp_path / "val", [(36, 52, 0.4), (44, 60, 0.6)], prefix="v")


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded: the paths must be checked before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the paths were checked")
    monkeypatch.setattr("hummingbird_fungi.segment.segmenter.create_encoder", refuse)
    monkeypatch.setattr("hummingbird_fungi.eval.hbird.create_encoder", refuse)


def segment(*args: object) -> int:
    """`hbfungi segment` with the tiny random model."""
    return main(["segment", *map(str, args), *CLI_MODEL])


def refused(code: int, capsys, *names: object) -> str:
    """Assert exit code 2 and an error naming each of `names`; the error text."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "hbfungi: error:" in err
    for name in names:
        assert str(name) in err, (name, err)
    return err


# --------------------------------------------------------------------------- 1. outputs onto inputs


def test_segment_outputs_onto_inputs_are_refused_before_any_model(tmp_path, examples, val, capsys, no_model):
    (tmp_path / "linked").symlink_to(examples, target_is_directory=True)
    before = digest(examples, val)
    cases = [
        (["--examples", examples, "--images", examples / "images", "--out", examples], "--examples"),  # issue case
        (["--examples", examples, "--images", val / "images", "--ground-truth", val / "masks", "--out", val],
         "--ground-truth"),  # predictions would overwrite the ground truth, then be scored against themselves
        (["--examples", examples, "--images", val / "images", "--out", val / "images" / "out"], "--images"),
        (["--examples", examples, "--images", val / "images", "--out", tmp_path / "linked"], "resolves to"),
        (["--examples", examples, "--images", val / "images", "--out", tmp_path / "o",
          "--save-memory", examples / "bank"], "--save-memory"),
        (["--examples", examples, "--images", val / "images", "--out", tmp_path / "o",
          "--save-memory", tmp_path / "o"], "--save-memory"),
    ]
    for args, name in cases:
        refused(segment(*args), capsys, "refusing to write" if name != "--save-memory" else name, name)
    assert digest(examples, val) == before


def test_config_outputs_onto_inputs_are_refused_before_any_model(toy_dataset, tmp_path, capsys, no_model):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not really weights")
    bank = tmp_path / "bank"  # a sealed bank's manifest is all the checks read
    bank.mkdir()
    (bank / "manifest.json").write_bytes(manifest_json({
        "format_version": FORMAT_VERSION, "features": {"kind": "embeddings", "backbone": "x", "options": {}},
        "input_size": [64, 64], "num_classes": 3, "shards": [], "count": 0}))
    before = digest(toy_dataset, weights, bank)
    run = [*TINY, f"data.root={toy_dataset}"]
    cases = [
        (["hbird", "--out", toy_dataset / "results.json", *run], "data.root"),
        (["hbird", *run, f"memory.path={toy_dataset / 'images' / 'bank'}"], "data.root"),
        (["build-memory", *run, f"memory.path={toy_dataset / 'bank'}"], "data.root"),
        (["hbird", "--out", weights, *run, f"model.weights={weights}"], "model.weights"),
        (["evaluate", "--out", bank / "results.json", *run, f"memory.path={bank}"], "memory.path"),
    ]
    for args, name in cases:
        refused(main([str(a) for a in args]), capsys, "refusing to write", name)
    assert digest(toy_dataset, weights, bank) == before


# --------------------------------------------------------------------------- 2. planted symlinks, full disk


def test_planted_symlinks_are_replaced_not_followed(tmp_path, examples, val):
    victims = {name: tmp_path / f"victim_{i}" for i, name in enumerate(["masks/v0.png", "overlays/v1.png",
                                                                       "summary.json", "grid.png"])}
    out = tmp_path / "out"
    for name, victim in victims.items():
        victim.write_text(f"precious {name}")
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).symlink_to(victim)
    before = digest(examples, val, *victims.values())
    assert segment("--examples", examples, "--images", val / "images", "--out", out) == 0
    assert digest(examples, val, *victims.values()) == before
    for name in victims:
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 20
    assert not list(out.rglob(".*.tmp-*"))


def test_full_disk_is_a_clear_error_naming_the_file_and_leaves_no_partial_file(tmp_path, examples, val, capsys):
    out = tmp_path / "out"
    before = digest(examples, val)
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1500, old_limit[1]))  # writes past 1.5 kB fail, as on a full disk
    try:
        code = segment("--examples", examples, "--images", val / "images", "--out", out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    err = refused(code, capsys, "cannot write", out, "File too large")
    failed = Path(err.split("cannot write ")[1].split(":")[0])
    assert not failed.exists()
    assert not list(out.rglob(".*.tmp-*"))
    for png in out.rglob("*.png"):  # whatever was written is complete
        Image.open(png).load()
    assert digest(examples, val) == before


# --------------------------------------------------------------------------- 3. output locations first


def test_output_and_input_locations_are_checked_before_any_model(toy_dataset, tmp_path, examples, val, capsys,
                                                                 no_model):
    folder, file = tmp_path / "existing_dir", tmp_path / "file.txt"
    folder.mkdir()
    (tmp_path / "summary.json").mkdir()  # where `segment --out tmp_path` writes its summary
    file.write_text("a file")
    damaged = tmp_path / "damaged_bank"
    damaged.mkdir()
    (damaged / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "shards": [], "count": 0}))
    before = digest(toy_dataset, examples, val, file)
    run = [*TINY, f"data.root={toy_dataset}"]
    long_name = tmp_path / ("x" * 300 + ".json")
    for args, names in [
        (["hbird", "--out", folder, *run], [folder, "is a directory"]),
        (["build-memory", "--out", folder, *run, f"memory.path={tmp_path / 'b'}"], [folder, "is a directory"]),
        (["evaluate", "--out", file / "r.json", *run, f"memory.path={damaged}"], [file, "not a directory"]),
        (["hbird", "--out", long_name, *run], ["longer than 255"]),
        (["hbird", *run, f"memory.path={file / 'bank'}"], ["memory.path", file]),
        (["hbird", *run, f"memory.path={damaged}"], [damaged / "manifest.json", "features"]),
        (["hbird", *run, f"model.weights={tmp_path / 'missing.pth'}"], ["model.weights", "missing.pth"]),
        (["knn", "--out", folder, "data.root=whatever"], [folder, "is a directory"]),
    ]:
        refused(main([str(a) for a in args]), capsys, *names)
    seg = ["--examples", examples, "--images", val / "images"]
    for args, names in [
        ([*seg, "--out", file], [file, "not a directory"]),
        ([*seg, "--out", tmp_path], [tmp_path / "summary.json", "is a directory"]),
        (["--examples", examples, "--images", tmp_path / "nowhere", "--out", tmp_path / "o"], ["nowhere"]),
        ([*seg, "--out", tmp_path / "o", "--save-memory", folder], [folder, "already exists"]),
        ([*seg, "--out", tmp_path / "o", "--save-memory", file / "bank"], ["--save-memory", file]),
        ([*seg, "--out", tmp_path / "o", "--weights", tmp_path / "missing.pth"], ["--weights", "missing.pth"]),
        (["--memory", damaged, "--images", val / "images", "--out", tmp_path / "o"], [damaged, "features"]),
    ]:
        refused(segment(*args), capsys, *names)
    if os.geteuid() != 0:  # root writes anywhere
        folder.chmod(0o555)
        refused(segment(*seg, "--out", folder / "o"), capsys, folder, "not writable")
    assert digest(toy_dataset, examples, val, file) == before


# --------------------------------------------------------------------------- 4. nothing done, void, label space


def test_nothing_segmented_is_not_success(tmp_path, examples, capsys):
    empty, broken, out = tmp_path / "empty", tmp_path / "broken", tmp_path / "out"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here")
    broken.mkdir()
    for name in ("a.jpg", "b.png"):
        (broken / name).write_bytes(b"not an image")
    before = digest(examples, empty, broken)
    refused(segment("--examples", examples, "--images", empty, "--out", out), capsys, "no images to segment", empty)
    code = segment("--examples", examples, "--images", broken, "--out", out)
    printed = capsys.readouterr()
    assert code == 2 and "0/2 images segmented" in printed.out
    assert "hbfungi: error: none of the 2 images" in printed.err and "a.jpg" in printed.out
    summary = strict_json(out / "summary.json")
    assert [Path(f["file"]).name for f in summary["segment"]["failed"]] == ["a.jpg", "b.png"]
    void = write_pairs(tmp_path / "void", [(40, 56, 0.3), (48, 64, 0.5)])
    for mask in (void / "masks").iterdir():
        Image.fromarray(np.full((48 if mask.name == "e1.png" else 40, 64 if mask.name == "e1.png" else 56), 255,
                                np.uint8)).save(mask)
    refused(segment("--examples", void, "--images", examples / "images", "--out", out), capsys, "void",
            void / "masks" / "e0.png")
    assert digest(examples, empty, broken) == before


def test_void_ground_truth_gives_na_and_strict_json(tmp_path, examples, val, capsys):
    for mask in (val / "masks").iterdir():
        Image.fromarray(np.full(np.asarray(Image.open(mask)).shape, 255, np.uint8)).save(mask)
    before = digest(examples, val)
    out = tmp_path / "out"
    assert segment("--examples", examples, "--images", val / "images", "--ground-truth", val / "masks",
                   "--out", out) == 0
    assert "mIoU n/a" in capsys.readouterr().out
    metrics = strict_json(out / "summary.json")["metrics"]
    assert metrics["miou"] is None and metrics["miou_reference"] is None and metrics["pixel_accuracy"] is None
    assert digest(examples, val) == before  # (an evaluation with void ground truth: tests/test_strict_json.py)


def test_ids_past_the_label_space_are_refused_or_counted(tmp_path, examples, val, capsys, caplog):
    wide = write_pairs(tmp_path / "wide", [(40, 56, 0.3), (48, 64, 0.5)])
    mask = np.asarray(Image.open(wide / "masks" / "e1.png")).astype(np.uint16)
    mask[:4] = 65535  # a 16-bit void the user did not name
    Image.fromarray(mask).save(wide / "masks" / "e1.png")
    before = digest(wide, val)
    out = tmp_path / "out"
    refused(segment("--examples", wide, "--images", val / "images", "--out", out), capsys,
            wide / "masks" / "e1.png", "65535", "ignore")
    assert segment("--examples", wide, "--images", val / "images", "--out", out, "--ignore-index", "65535") == 0
    assert strict_json(out / "summary.json")["segmenter"]["num_classes"] == 3
    assert digest(wide, val) == before

    named = write_pairs(tmp_path / "named", [(40, 56, 0.3), (48, 64, 0.5), (40, 48, 0.7)])
    (named / "dataset.yaml").write_text(yaml.safe_dump({"classes": ["blue", "red", "green"]}))
    bad = np.asarray(Image.open(named / "masks" / "e2.png")).copy()
    bad[0, 0] = 9
    Image.fromarray(bad).save(named / "masks" / "e2.png")
    before = digest(named)
    err = refused(segment("--examples", named, "--images", val / "images", "--out", out), capsys,
                  named / "masks" / "e2.png", "[9]")
    assert "images/e2.png" not in err and digest(named) == before

    camvid = write_pairs(tmp_path / "camvid", [(40, 56, 0.3), (48, 64, 0.5)])  # id 3 marks void, as CamVid's 11
    for file in (camvid / "masks").iterdir():
        m = np.asarray(Image.open(file)).copy()
        m[-3:] = 3
        Image.fromarray(m).save(file)
    images, masks = sorted((camvid / "images").iterdir()), sorted((camvid / "masks").iterdir())
    spec = tmp_path / "camvid.yaml"
    spec.write_text(yaml.safe_dump({"classes": ["blue", "red", "green"]}))  # no ignore_index given
    options = {"backbone": "vit_tiny_patch16_224", "pretrained": False,
               "backbone_kwargs": {"depth": 2, "patch_size": 8},
               "input_size": (48, 64), "device": "cpu", "retrieval": RetrievalOptions(k=5)}
    with pytest.raises(DataError, match=r"e0.png.*\[3\]"):
        InContextSegmenter.from_examples(images, masks, dataset_yaml=spec, **options)
    spec.write_text(yaml.safe_dump({"classes": ["blue", "red", "green"], "ignore_index": 3}))
    assert InContextSegmenter.from_examples(images, masks, dataset_yaml=spec, **options).num_classes == 3
    caplog.clear()
    assert InContextSegmenter.from_examples(images, masks, **options).num_classes == 4
    assert "4 classes inferred from the largest id 3" in caplog.text

    truth = np.asarray(Image.open(val / "masks" / "v0.png")).copy()
    truth[:2] = 7  # not a class, not void
    Image.fromarray(truth).save(val / "masks" / "v0.png")
    caplog.clear()
    assert segment("--examples", examples, "--images", val / "images", "--ground-truth", val / "masks",
                   "--out", out) == 0
    assert strict_json(out / "summary.json")["segment"]["unscored_ground_truth_pixels"] == {"7": 2 * 52}
    assert "id 7: 104 pixels" in caplog.text


# --------------------------------------------------------------------------- 5. a bank reused for another recipe


def test_saved_bank_is_not_reused_for_another_recipe(toy_dataset, tmp_path, capsys):
    bank = tmp_path / "b"
    run = [*TINY, f"data.root={toy_dataset}", f"memory.path={bank}"]
    assert main(["build-memory", *run, "memory.size=8"]) == 0
    before = digest(toy_dataset, bank)
    refused(main(["hbird", "--out", str(tmp_path / "r.json"), *run, "memory.size=null", "seed=7"]), capsys,
            "different settings", "spec.size", "spec.seed", "patches_per_image")
    refused(main(["evaluate", *run, "memory.size=8", "data.subset=3"]), capsys,
            "data.subset", "files", "num_images")
    assert not (tmp_path / "r.json").exists()
    assert digest(toy_dataset, bank) == before


# --------------------------------------------------------------------------- 8. errors that hide


def test_worker_errors_are_concise_and_on_their_own_line(toy_dataset, tmp_path, capsys):
    bad = toy_dataset / "images" / "train" / "train004.png"
    corrupt(bad)
    before = digest(toy_dataset)
    err = refused(main(["build-memory", *TINY, f"data.root={toy_dataset}", "data.num_workers=1",
                        f"memory.path={tmp_path / 'b'}"]), capsys, "cannot read image", bad)
    assert "Traceback" not in err and "DataLoader worker" not in err
    line = next(line for line in err.splitlines() if "hbfungi: error:" in line)
    assert line.startswith("hbfungi: error: cannot read image"), err
    assert digest(toy_dataset) == before

"""Tuning on the memory alone: folds by image, the evaluated split never read, the grid against a direct
recomputation, the tuned preset round trip and the segmenter's leave-one-image-out."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hummingbird_fungi.cli.main import main
from hummingbird_fungi.config.loader import load_config
from hummingbird_fungi.config.schema import FeatureOptions, TuneOptions
from hummingbird_fungi.data.segmentation import SegmentationDataset
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.eval.bootstrap import dataset_miou
from hummingbird_fungi.eval.tune import LEAVE_ONE_OUT, Candidate, ExampleTuner, fold_ids, tune
from hummingbird_fungi.testing import make_folder_dataset

MODEL = ["model.name=vit_tiny_patch16_224", "model.pretrained=false", "model.input_size=64", "device=cpu",
         "data.num_workers=0", "data.kind=folder", "data.train_split=train", "memory.size=null"]
SMALL = TuneOptions(k=[3, 5], temperatures=[0.02, 0.1], resamples=50)


def config(root: Path, *extra: str):
    return load_config(None, [f"data.root={root}", *MODEL, *extra])


def test_folds_partition_the_images_and_few_images_are_left_out_one_by_one():
    folds = fold_ids(10, 3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(10)) and len(folds) == 3
    assert [f.tolist() for f in fold_ids(10, 3, seed=0)] == [f.tolist() for f in folds]
    assert len(fold_ids(4, 10, seed=0)) == 4


def test_tuning_never_reads_the_evaluated_split(tmp_path, monkeypatch):
    """The val images are removed and every image read is recorded: tuning works from train images alone."""
    root = make_folder_dataset(tmp_path / "toy", n_train=LEAVE_ONE_OUT + 4, n_val=3)
    shutil.rmtree(root / "images" / "val")
    shutil.rmtree(root / "annotations" / "val")
    read = []
    original = SegmentationDataset.load

    def spy(self, index):
        read.append(str(self.samples[index][0]))
        return original(self, index)

    monkeypatch.setattr(SegmentationDataset, "load", spy)
    tuning = tune(config(root), TuneOptions(features=["embeddings"], k=[3], temperatures=[0.1], resamples=20))
    assert read and all("/train/" in path for path in read)
    assert tuning.images == LEAVE_ONE_OUT + 4 and tuning.folds == 3  # above LEAVE_ONE_OUT: tune.folds


def test_grid_scores_equal_a_direct_leave_one_out(tmp_path):
    """Every grid point's held-out mIoU equals a recomputation: each image segmented by a bank of the others."""
    import torch.nn.functional as F

    from hummingbird_fungi.data.transforms import EvalTransform
    from hummingbird_fungi.eval.study import predict_rows
    from hummingbird_fungi.memory.labels import patchify_labels, soft_labels
    from hummingbird_fungi.models.factory import create_encoder

    root = make_folder_dataset(tmp_path / "toy", n_train=5, n_val=1)
    cfg = config(root)
    tuning = tune(cfg, TuneOptions(features=["embeddings"], transforms=["none"], k=[3], temperatures=[0.05],
                                   resamples=20))
    assert tuning.folds == 5
    encoder = create_encoder(cfg.model.name, pretrained=False, seed=cfg.seed)
    from hummingbird_fungi.eval.hbird import config_dataset

    data = config_dataset(cfg, "train").with_transform(EvalTransform((64, 64), normalize=cfg.data.normalize))
    items = [data[i] for i in range(len(data))]
    with torch.no_grad():
        tokens = F.normalize(encoder(torch.stack([i["image"] for i in items])).float(), dim=-1)  # (5, N, E)
    masks = torch.stack([i["mask"] for i in items])
    counts = patchify_labels(masks, 16, 3, False)
    matrices = []
    for held in range(5):
        others = [i for i in range(5) if i != held]
        prediction = next(predict_rows(tokens[others].reshape(-1, tokens.shape[-1]),
                                       soft_labels(counts[others].reshape(-1, 3)), tokens[held], (4, 4), [(64, 64)],
                                       [(3, 0.05)], [masks[held]], 255))
        matrices.append(prediction.confusions[(3, 0.05)].numpy())
    row = next(r for r in tuning.grid if r["candidate"] == Candidate("embeddings") and r["k"] == 3)
    assert row["miou"] == pytest.approx(dataset_miou(np.sum(matrices, 0)))


def test_tuned_preset_round_trips_through_config_show(tmp_path, capsys):
    root = make_folder_dataset(tmp_path / "toy", n_train=6, n_val=2)
    out, results = tmp_path / "tuned.yaml", tmp_path / "tune.json"
    args = ["tune", "--out", str(out), "--results", str(results), f"data.root={root}", *MODEL, "tune.k=[3,5]",
            "tune.temperatures=[0.02,0.1]", "tune.resamples=20", "memory.path=" + str(tmp_path / "bank")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "<- chosen" in printed and "embeddings+whiten" in printed
    text = out.read_text()
    assert text.startswith("# Tuned by `hbfungi tune`") and "95% interval" in text
    tuned = load_config(out)
    chosen = yaml.safe_load(results.read_text())["best"]
    assert (tuned.retrieval.k, tuned.transfer.temperature) == (chosen["k"], chosen["temperature"])
    assert tuned.memory.path is None and tuned.data.root == str(root)
    assert main(["config", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"retrieval.k: {chosen['k']}" in shown
    assert main(args) == 2  # never written over
    assert "exists" in capsys.readouterr().err


def test_tune_keys_are_checked_before_any_work(tmp_path, capsys):
    root = make_folder_dataset(tmp_path / "toy", n_train=3, n_val=1)
    assert main(["tune", "--out", str(tmp_path / "t.yaml"), f"data.root={root}", *MODEL, "tune.k=[0]"]) == 2
    assert "tune.k" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="negatives"):
        tune(config(root, "features.fungi.negatives=support"), SMALL)


def test_segmenter_tunes_on_its_examples_by_leaving_one_out(tmp_path):
    from hummingbird_fungi.segment.segmenter import InContextSegmenter
    from hummingbird_fungi.testing import VOID, make_scene

    rng = np.random.default_rng(0)
    scenes = [make_scene(rng, (64, 64)) for _ in range(4)]
    tuner = ExampleTuner(TuneOptions(features=["embeddings"], k=[2, 4], temperatures=[0.05], resamples=20))
    segmenter = InContextSegmenter.from_examples([s[0] for s in scenes], [s[1] for s in scenes],
                                                 "vit_tiny_patch16_224", pretrained=False, input_size=(64, 64),
                                                 device="cpu", tune=tuner, num_classes=3, ignore_index=VOID,
                                                 features=FeatureOptions())  # the baseline: raw embeddings too
    assert tuner.tuning.folds == 4
    best = tuner.tuning.best
    assert (segmenter.retrieval.k, segmenter.transfer_options.temperature) == (best["k"], best["temperature"])
    assert segmenter.extractor.manifest()["kind"] == "embeddings"
    assert segmenter.predict(scenes[0][0]).shape == (64, 64)


def test_segment_tune_flag_records_the_choice(toy_dataset, tmp_path, capsys):
    import json

    examples = tmp_path / "examples"
    (examples / "images").mkdir(parents=True)
    shutil.copytree(toy_dataset / "images" / "train", examples / "images", dirs_exist_ok=True)
    shutil.copytree(toy_dataset / "annotations" / "train", examples / "masks")
    shutil.copy(toy_dataset / "dataset.yaml", examples / "dataset.yaml")
    out = tmp_path / "out"
    cli = ["segment", "--examples", str(examples), "--images", str(toy_dataset / "images" / "val"), "--out", str(out),
           "--backbone", "vit_tiny_patch16_224", "--random-init", "--input-size", "64x64", "--device", "cpu"]
    assert main([*cli, "--tune"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    tuning = summary["segmenter"]["tuning"]
    assert tuning["folds"] == 6 and tuning["images"] == 6
    assert (summary["segmenter"]["k"], summary["segmenter"]["temperature"]) == (tuning["best"]["k"],
                                                                                tuning["best"]["temperature"])
    assert main([*cli[:-2], "--memory", str(tmp_path), "--tune"]) == 2


def test_defaults_by_audience(tmp_path):
    """Benchmarks keep the reference's raw embeddings, k=30, T=0.02; a user's segment gets whitened FUNGI (with
    shrinkage and the row guard) and video --frames raw FUNGI; flags win."""
    from hummingbird_fungi.cli.main import build_parser
    from hummingbird_fungi.cli.segment import segmenter_options, video_segmenter_options
    from hummingbird_fungi.config.loader import load_config
    from hummingbird_fungi.segment.video import video_protocol

    bench = load_config("camvid_dinov2_vits14")
    assert (bench.features.kind, bench.features.transform.pca, bench.retrieval.k, bench.transfer.temperature) == (
        "embeddings", False, 30, 0.02)
    parse = build_parser().parse_args
    seg = segmenter_options(parse(["segment", "--examples", "e", "--images", "i", "--out", "o"]))
    transform = seg["features"].transform
    assert (seg["features"].kind, transform.pca, transform.shrinkage, transform.min_rows_per_dim) == (
        "fungi", True, "ledoit_wolf", 10)
    assert (seg["retrieval"].k, seg["transfer"].temperature) == (30, 0.02)
    forced = segmenter_options(parse(["segment", "--examples", "e", "--images", "i", "--out", "o", "--whiten"]))
    assert forced["features"].transform.min_rows_per_dim is None  # --whiten: whatever the row count
    frames = parse(["video", "--frames", "f", "--masks", "m", "--out", "o"])
    davis = parse(["video", "--davis", "d", "--out", "o"])
    first, dino = video_protocol("first"), video_protocol("dino")
    user, bench_video = video_segmenter_options(frames, first), video_segmenter_options(davis, dino)
    assert (user["features"].kind, user["features"].transform.pca) == ("fungi", False)
    assert (bench_video["features"].kind, bench_video["features"].transform.pca) == ("embeddings", False)
    assert (bench_video["retrieval"].k, bench_video["transfer"].temperature) == (5, 0.1)

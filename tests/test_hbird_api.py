"""Bring-your-own-model evaluation: hbird_evaluation (open-hummingbird-eval's arguments), evaluate, CLI, segmenter."""

import json

import numpy as np
import pytest
import torch

from hummingbird_fungi import (
    DataOptions,
    FeatureOptions,
    InContextSegmenter,
    MemoryOptions,
    RetrievalOptions,
    TransferOptions,
    build_dataset,
    create_encoder,
    evaluate,
    hbird_evaluation,
)
from hummingbird_fungi.cli.main import main
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.models.backbones import load_backbone
from hummingbird_fungi.models.encoders import CallableEncoder
from hummingbird_fungi.testing import TinyCNN, patch_token_fn, tiny_timm_vit, tiny_torchvision_vit

E = 32  # width of the tiny models
OHE = {"dataset_name": "folder", "input_size": 64, "batch_size": 3, "num_workers": 0, "nn_method": "torch",
       "n_neighbours": 5, "memory_size": None, "device": "cpu"}
PLAIN = {"memory": MemoryOptions(size=None, augment=False), "transfer": TransferOptions(temperature=0.1)}


@pytest.mark.parametrize("kind", ["timm", "torchvision", "cnn", "feature_fn"])
def test_hbird_evaluation_takes_any_model(toy_dataset, kind):
    models = {
        "timm": (tiny_timm_vit(), {}),
        "torchvision": (tiny_torchvision_vit(), {}),
        "cnn": (TinyCNN(stride=16, dim=E), {}),
        "feature_fn": (tiny_timm_vit(seed=1), {"ftr_extr_fn": patch_token_fn}),
    }
    model, extra = models[kind]
    if kind == "cnn":  # a CNN needs its stride: wrap it, as a user would, then pass the encoder
        model = create_encoder(model, stride=16)
    miou, details = hbird_evaluation(model, E, 16, data_dir=str(toy_dataset), return_knn_details=True,
                                     **OHE, **extra)
    assert miou == details["miou_reference"] and 0.0 <= miou <= 1.0
    assert details["memory"]["rows"] == 6 * 16  # unbounded: every patch of the 6 train images
    assert details["features"]["dim"] == E and set(details["per_class_iou"]) == {"sky", "road", "car"}
    assert hbird_evaluation(model, E, 16, data_dir=str(toy_dataset), **OHE, **extra) == miou  # reproducible


def test_hbird_evaluation_is_evaluate_with_ohe_defaults(toy_dataset):
    """The wrapper adds nothing: the same encoder through evaluate() with the same settings scores the same."""
    encoder = create_encoder(TinyCNN(stride=16, dim=E), stride=16)
    wrapped = hbird_evaluation(encoder, E, 16, data_dir=str(toy_dataset), return_knn_details=True, seed=3, **OHE)[1]
    direct = evaluate(encoder, build_dataset("folder", toy_dataset, "train"),
                      build_dataset("folder", toy_dataset, "val"),
                      input_size=64, memory=MemoryOptions(size=None), retrieval=RetrievalOptions(k=5),
                      data=DataOptions(batch_size=3), device="cpu", seed=3)
    assert wrapped["miou"] == direct["miou"] and wrapped["per_class_iou"] == direct["per_class_iou"]
    # a CNN's map flattened by hand as an OHE feature function gives the very same evaluation
    by_hand = CallableEncoder(encoder.model, lambda m, x: m(x).flatten(2).transpose(1, 2), patch_size=16, embed_dim=E)
    again = hbird_evaluation(by_hand, E, 16, data_dir=str(toy_dataset), return_knn_details=True, seed=3, **OHE)[1]
    assert again["miou"] == direct["miou"]


def test_colour_features_segment_the_toy_scenes(toy_dataset):
    """A feature function that returns each patch's mean colour separates sky, road and car: retrieval works."""
    def colour(model, images):
        return torch.nn.functional.avg_pool2d(images, 16).flatten(2).transpose(1, 2)

    miou = hbird_evaluation(torch.nn.Identity(), 3, 16, data_dir=str(toy_dataset), ftr_extr_fn=colour, **OHE)
    assert miou > 0.6


@pytest.mark.parametrize("kind", ["timm", "torchvision"])
def test_patch_fungi_on_user_models(toy_dataset, kind):
    model = tiny_timm_vit() if kind == "timm" else tiny_torchvision_vit()
    features = FeatureOptions(kind="fungi")
    miou, details = hbird_evaluation(model, E, 16, data_dir=str(toy_dataset), return_knn_details=True,
                                     features=features, **OHE)
    manifest = details["features"]
    assert manifest["kind"] == "fungi" and manifest["dim"] == 2 * E
    assert manifest["options"]["layer"] == ("blocks.-1.attn.qkv" if kind == "timm" else "encoder.layers.-1.mlp.3")
    assert 0.0 <= miou <= 1.0
    plain = hbird_evaluation(model, E, 16, data_dir=str(toy_dataset), return_knn_details=True, **OHE)[1]
    assert plain["features"]["dim"] == E


def test_fungi_needs_a_nameable_linear_layer(toy_dataset):
    cnn = create_encoder(TinyCNN(stride=16, dim=E), stride=16)
    with pytest.raises(ConfigError, match="no default gradient layer"):
        hbird_evaluation(cnn, E, 16, data_dir=str(toy_dataset), features=FeatureOptions(kind="fungi"), **OHE)
    with pytest.raises(ConfigError, match="not an nn.Linear"):
        hbird_evaluation(tiny_timm_vit(), E, 16, data_dir=str(toy_dataset), **OHE,
                         features=FeatureOptions.from_mapping({"kind": "fungi", "fungi": {"layer": "blocks.-1.norm1"}}))
    with pytest.raises(ConfigError, match="patch size 16 and dimension 32"):
        hbird_evaluation(tiny_timm_vit(), 64, 16, data_dir=str(toy_dataset), **OHE)


def test_native_api_cli_and_segmenter_agree(toy_dataset, tmp_path):
    """One named random-init backbone through evaluate(), `hbfungi hbird` and InContextSegmenter: one mIoU."""
    torch.manual_seed(0)
    encoder = load_backbone("vit_tiny_patch16_224", pretrained=False)
    native = evaluate(encoder, build_dataset("folder", toy_dataset, "train"),
                      build_dataset("folder", toy_dataset, "val"), input_size=64,
                      data=DataOptions(normalize="imagenet", batch_size=3),
                      retrieval=RetrievalOptions(k=5), **PLAIN)

    out = tmp_path / "cli.json"
    assert main(["hbird", "--out", str(out), "model.name=vit_tiny_patch16_224", "model.pretrained=false",
                 "model.input_size=64", "data.kind=folder", f"data.root={toy_dataset}", "data.train_split=train",
                 "data.eval_split=val", "data.num_workers=0", "data.batch_size=3", "data.normalize=imagenet",
                 "memory.size=null", "memory.augment=false", "retrieval.k=5", "transfer.temperature=0.1"]) == 0
    cli = json.loads(out.read_text())

    train, val = (sorted((toy_dataset / "images" / s).glob("*.png")) for s in ("train", "val"))
    masks = [[toy_dataset / "annotations" / p.parent.name / p.name for p in files] for files in (train, val)]
    segmenter = InContextSegmenter.from_examples(train, masks[0], backbone=encoder.model, input_size=(64, 64),
                                                 num_classes=3, ignore_index=3, class_names=["sky", "road", "car"],
                                                 retrieval=RetrievalOptions(k=5),
                                                 transfer=TransferOptions(temperature=0.1), features=FeatureOptions(),
                                                 data=DataOptions(normalize="imagenet", batch_size=3), device="cpu")
    seg = segmenter.evaluate(val, masks[1], batch_size=3)

    assert cli["miou"] == pytest.approx(native["miou"], abs=1e-12) and seg["miou"] == pytest.approx(native["miou"],
                                                                                                  abs=1e-12)
    assert cli["miou_reference"] == pytest.approx(native["miou_reference"], abs=1e-12)
    assert seg["per_class_iou"] == pytest.approx(native["per_class_iou"], abs=1e-12)
    assert np.isfinite(native["miou"]) and cli["memory"]["rows"] == native["memory"]["rows"] == 96

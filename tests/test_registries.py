"""Registries are the only name lists: the schema, the command line and `hbfungi list` all ask them."""

import dataclasses
import re
import typing

import pytest
import torch

import hummingbird_fungi.config.schema as schema
from hummingbird_fungi.cli.main import build_parser, config_from_args, main
from hummingbird_fungi.config.typed import Section
from hummingbird_fungi.data.segmentation import SEGMENTATION_DATASETS, SegmentationDataset, build_dataset, folder_dataset
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.features import PATCH_FEATURES
from hummingbird_fungi.features.fungi_image import IMAGE_OBJECTIVES
from hummingbird_fungi.features.fungi_patch import PATCH_OBJECTIVES, FungiPatchFeatures, KLPatchObjective
from hummingbird_fungi.features.projection import PROJECTIONS
from hummingbird_fungi.models.encoders import TimmViTEncoder
from hummingbird_fungi.registry import Registry
from hummingbird_fungi.retrieval.indexes import BACKENDS
from hummingbird_fungi.testing import make_folder_dataset, tiny_timm_vit

REGISTRIES = [SEGMENTATION_DATASETS, BACKENDS, PATCH_OBJECTIVES, IMAGE_OBJECTIVES, PATCH_FEATURES, PROJECTIONS]


@pytest.fixture
def toy_kind():
    """A dataset kind registered from Python for one test."""

    @SEGMENTATION_DATASETS.register("toy_scenes")
    def toy_scenes(root, split, file_set=None, **kw) -> SegmentationDataset:
        """Toy street scenes in the folder layout."""
        return folder_dataset(root, split, file_set, **kw)

    try:
        yield "toy_scenes"
    finally:
        SEGMENTATION_DATASETS.unregister("toy_scenes")


def cli_config(*argv: str):
    """The `hbfungi hbird` configuration, built as the command line builds it."""
    return config_from_args(build_parser().parse_args(["hbird", "--device", "cpu", *argv]))


def test_a_dataset_registered_from_python_is_accepted_by_the_cli(toy_kind, tmp_path):
    root = make_folder_dataset(tmp_path / "toy")
    config = cli_config(f"data.kind={toy_kind}", f"data.root={root}")
    assert config.data.kind == toy_kind
    assert len(build_dataset(config.data.kind, config.data.root, "train")) == 6
    with pytest.raises(ConfigError, match=r"data\.kind='toy_scenez'.*did you mean 'toy_scenes'"):
        cli_config("data.kind=toy_scenez")


def test_an_unregistered_dataset_is_refused_naming_the_key(capsys):
    with pytest.raises(ConfigError, match=r"data\.kind='toy_scenes': unknown dataset kind.*choose one of .*voc"):
        cli_config("data.kind=toy_scenes")  # the fixture's kind, not registered here
    assert main(["hbird", "data.kind=no_such_kind"]) == 2
    assert "data.kind='no_such_kind'" in capsys.readouterr().err


def test_list_datasets_prints_the_registered_names(toy_kind, capsys):
    assert main(["list", "datasets"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert set(SEGMENTATION_DATASETS.names()) <= set(names) and toy_kind in names
    assert re.search(rf"^  {toy_kind} +Toy street scenes in the folder layout\.$", out, re.M)


def test_list_objectives_labels_patch_and_image_objectives(capsys):
    assert main(["list", "objectives"]) == 0
    out = capsys.readouterr().out
    patch, image = out.split("\nimage (")
    assert patch.startswith("patch (features.fungi.objective):")
    assert [line.split()[0] for line in patch.splitlines()[1:]] == PATCH_OBJECTIVES.names()
    assert [line.split()[0] for line in image.splitlines()[1:]] == IMAGE_OBJECTIVES.names()
    assert main(["list", "backends"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == BACKENDS.names()


def test_list_presets_is_hbfungi_configs(capsys):
    assert main(["configs"]) == 0
    configs = capsys.readouterr().out
    assert main(["list", "presets"]) == 0
    assert capsys.readouterr().out == configs


def literal_values(hint: object) -> list[set]:
    """The values of every Literal inside a type hint."""
    if typing.get_origin(hint) is typing.Literal:
        return [set(typing.get_args(hint))]
    return [values for arg in typing.get_args(hint) for values in literal_values(arg)]


def test_no_schema_literal_repeats_a_registry():
    sections = [cls for cls in vars(schema).values() if isinstance(cls, type) and issubclass(cls, Section)]
    literals = [values for cls in sections for hint in typing.get_type_hints(cls).values()
                for values in literal_values(hint)]
    assert len(sections) > 10 and literals  # the walk sees the schema
    for registry in REGISTRIES:
        assert not any(set(registry.names()) <= values for values in literals), registry.what
    fields = {f.name: f for cls in (schema.DataOptions, schema.FungiOptions, schema.FeatureOptions,
                                    schema.RetrievalOptions, schema.ImageFeatureOptions) for f in dataclasses.fields(cls)}
    for name in ("kind", "objective", "backend", "objectives"):
        assert "`hbfungi list" in fields[name].metadata["doc"], name


def test_a_patch_objective_registered_from_python_is_used():
    class KLAgain(KLPatchObjective):
        """The kl objective under another name."""

        name = "kl_again"

    PATCH_OBJECTIVES.register(KLAgain.name)(KLAgain)
    try:
        encoder = TimmViTEncoder(tiny_timm_vit(img_size=32, patch_size=8).requires_grad_(False), name="tiny",
                                 weights_id="random")
        images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        again = FungiPatchFeatures(encoder, objective="kl_again", head_dim=8)
        assert isinstance(again.objective, KLAgain)
        torch.testing.assert_close(again(images), FungiPatchFeatures(encoder, objective="kl", head_dim=8)(images),
                                   rtol=0, atol=0)
    finally:
        PATCH_OBJECTIVES.unregister("kl_again")
    with pytest.raises(ConfigError, match="features.fungi.objective='kl_again'"):
        schema.FungiOptions(objective="kl_again")


def test_registry_check_and_unregister():
    registry: Registry[int] = Registry("thing")
    registry.register("one")(1)
    assert registry.check("one") is None and registry.get("one") == 1
    assert registry.check("onw") == "unknown thing 'onw' (did you mean 'one'?); choose one of one"
    registry.unregister("one")
    assert "one" not in registry and registry.names() == []

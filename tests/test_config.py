"""Typed configuration: presets, dotted overrides, type and range checks before any model is loaded."""

from pathlib import Path

import pytest

import hummingbird_fungi.models.backbones as backbones
from hummingbird_fungi.cli.main import main
from hummingbird_fungi.config.loader import load_config
from hummingbird_fungi.config.schema import (
    FungiOptions,
    HbirdConfig,
    KnnConfig,
    MemoryOptions,
    RetrievalOptions,
    parse_size,
)
from hummingbird_fungi.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_overrides_parse_yaml_values_into_typed_sections():
    cfg = load_config(CONFIGS / "camvid_dinov2_vits14.yaml",
                      ["data.root=/x", "memory.size=102400", "model.weights=w.pth", "memory.size=null",
                       "model.input_size=[224,320]", "features.fungi.projection=dense", "transfer.temperature=1"])
    assert isinstance(cfg, HbirdConfig)
    assert cfg.data.root == "/x" and cfg.memory.size is None
    assert cfg.model.input_size == (224, 320) and cfg.features.fungi.projection == "dense"
    assert cfg.features.fungi.head_dim == 96  # untouched defaults stay
    assert cfg.data.train_split == "train" and cfg.transfer.temperature == 1.0
    assert isinstance(cfg.transfer.temperature, float)
    assert cfg.to_dict()["model"]["input_size"] == [224, 320]


def test_unknown_keys_are_named_with_suggestions():
    with pytest.raises(ConfigError, match=r"'data.rot'.*data.root"):
        load_config(None, ["data.rot=/x"])
    with pytest.raises(ConfigError, match="features.fungi.projektion"):
        load_config(None, ["features.fungi.projektion=dense"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["data.root"])
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(CONFIGS / "nope.yaml")


@pytest.mark.parametrize("override, key", [
    ("retrieval.k=0", "retrieval.k=0"),
    ("retrieval.k=-3", "retrieval.k=-3"),
    ("retrieval.k=ten", "retrieval.k='ten'"),
    ("retrieval.k=2.5", "retrieval.k=2.5"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("data.batch_size=-1", "data.batch_size=-1"),
    ("transfer.temperature=0", "transfer.temperature=0"),
    ("transfer.temperature=-0.1", "transfer.temperature=-0.1"),
    ("memory.dtype=float8", "memory.dtype='float8'"),
    ("memory.augment=maybe", "memory.augment='maybe'"),
    ("features.fungi.tau=0", "features.fungi.tau=0"),
    ("features.fungi.n_neg=9", "features.fungi.n_neg=9"),
    ("features.kind=fungii", "features.kind='fungii'"),
    ("model.input_size=big", "model.input_size='big'"),
    ("device=gpu", "device='gpu'"),
])
def test_bad_values_are_named(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert key in str(error.value)


def test_knn_schema_checks_objective_options_and_lists():
    cfg = load_config(None, ["knn.vote=weighted", "knn.shots=[full, 5]"], schema=KnnConfig)
    assert cfg.knn.vote == ["weighted"] and cfg.knn.shots == ["full", 5]
    assert cfg.model.name == "dinov2_vits14" and cfg.model.input_size == (224, 224)
    assert load_config(None, ["model.weights=w.pth"], schema=KnnConfig).model.input_size == (224, 224)
    with pytest.raises(ConfigError, match="features.kl.temprature"):
        load_config(None, ["features.kl.temprature=3"], schema=KnnConfig)
    with pytest.raises(ConfigError, match="features.dino.local_views=-1"):
        load_config(None, ["features.dino.local_views=-1"], schema=KnnConfig)
    with pytest.raises(ConfigError, match="knn.shots"):
        load_config(None, ["knn.shots=[0]"], schema=KnnConfig)
    with pytest.raises(ConfigError, match="square"):
        load_config(None, ["model.input_size=[224,320]"], schema=KnnConfig)


def test_sections_built_in_python_are_checked_too():
    assert MemoryOptions(size=None).size is None
    with pytest.raises(ConfigError, match="memory.size=0"):
        MemoryOptions(size=0)
    with pytest.raises(ConfigError, match="retrieval.k=0"):
        RetrievalOptions(k=0)
    with pytest.raises(ConfigError, match="features.fungi.keep_prob=1.5"):
        FungiOptions(keep_prob=1.5)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(path):
    cfg = load_config(path, schema=KnnConfig if path.name.startswith("knn_") else HbirdConfig)
    height = cfg.model.input_size[0]
    assert height % 14 == 0 or height % 16 == 0


def test_input_size_forms():
    assert parse_size(224) == (224, 224)
    assert parse_size("336x448") == (336, 448)
    assert parse_size([336, 448]) == (336, 448)
    with pytest.raises(ValueError):
        parse_size("big")


@pytest.mark.parametrize("command, overrides", [
    ("hbird", ["retrieval.k=0"]),
    ("hbird", ["data.batch_size=-2"]),
    ("hbird", ["transfer.temperature=0"]),
    ("hbird", ["memory.dtype=int4"]),
    ("hbird", ["retrieval.k=many"]),
    ("hbird", ["retrieval.backend=faiss", "retrieval.options.nprobes=3"]),
    ("build-memory", ["features.fungi.rank=0"]),
    ("evaluate", ["features.fungi.colour=red"]),
    ("knn", ["features.simclr.negativs=4"]),
    ("knn", ["knn.k=0"]),
])
def test_cli_refuses_bad_values_with_exit_2_before_loading_a_model(command, overrides, tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr(backbones, "load_backbone", no_model)
    code = main([command, "data.root=" + str(tmp_path), "memory.path=" + str(tmp_path / "bank"), *overrides]
                if command != "knn" else [command, *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert overrides[-1].split("=")[0] in err

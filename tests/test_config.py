"""Presets, dotted overrides and key validation."""

from pathlib import Path

import pytest

from hummingbird_fungi.config.loader import input_size, load_config
from hummingbird_fungi.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_overrides_parse_yaml_values():
    cfg = load_config(CONFIGS / "camvid_dinov2_vits14.yaml",
                      ["data.root=/x", "memory.size=102400", "model.weights=w.pth", "memory.size=null",
                       "model.input_size=[224,320]", "features.fungi.projection=dense"])
    assert cfg["data"]["root"] == "/x" and cfg["memory"]["size"] is None
    assert cfg["model"]["input_size"] == [224, 320] and cfg["features"]["fungi"] == {"projection": "dense"}
    assert cfg["data"]["train_split"] == "train" and cfg["transfer"]["temperature"] == 0.02


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="data.rot"):
        load_config(None, ["data.rot=/x"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["data.root"])
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(CONFIGS / "nope.yaml")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(path):
    from hummingbird_fungi.config.loader import DEFAULTS
    from hummingbird_fungi.eval.knn import KNN_DEFAULTS

    cfg = load_config(path, defaults=KNN_DEFAULTS if path.name.startswith("knn_") else DEFAULTS)
    height = input_size(cfg["model"]["input_size"])[0]
    assert height % 14 == 0 or height % 16 == 0


def test_input_size_forms():
    assert input_size(224) == (224, 224)
    assert input_size("448x336") == (336, 448)
    assert input_size([336, 448]) == (336, 448)
    with pytest.raises(ConfigError):
        input_size("big")

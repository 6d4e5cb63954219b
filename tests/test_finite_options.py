"""Garbage in never becomes a plausible number: NaN and infinity are refused for every option, a section is never
null, every flag of segment/demo/video is checked before a model loads and named, and a recorded setting is never
written to a results file as null."""

import dataclasses
import json
import math
import re
import typing
from pathlib import Path
from typing import Any

import pytest

import hummingbird_fungi.models.factory as factory
from hummingbird_fungi.cli.main import main
from hummingbird_fungi.config.loader import nest
from hummingbird_fungi.config.schema import (DinoOptions, FungiOptions, HbirdConfig, KnnConfig, RetrievalOptions,
                                             TransferOptions)
from hummingbird_fungi.config.typed import Section, at_least, in_unit_interval, positive
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.fileio import write_json
from hummingbird_fungi.models.backbones import load_backbone
from hummingbird_fungi.testing import make_folder_dataset

PRESETS = {HbirdConfig: "camvid_dinov2_vits14", KnnConfig: "knn_digits_dinov2_vits14"}
NON_FINITE = (".nan", ".inf", "-.inf")
TINY = ["--backbone", "vit_tiny_patch16_224", "--random-init", "--device", "cpu", "--input-size", "64x64"]


def is_numeric(hint: Any) -> bool:
    """Whether a type hint takes an int or a float, alone or inside a union, tuple or list."""
    return hint in (int, float) or any(is_numeric(arg) for arg in typing.get_args(hint))


def option_keys(section: type[Section], numeric: bool, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, hint) of every numeric option (numeric=True) or every nested section (False) of a section."""
    rows = []
    hints = typing.get_type_hints(section)
    for field in dataclasses.fields(section):
        hint, key = hints[field.name], prefix + field.name
        if isinstance(hint, type) and issubclass(hint, Section):
            rows += ([] if numeric else [(key, hint)]) + option_keys(hint, numeric, key + ".")
        elif numeric and is_numeric(hint):
            rows.append((key, hint))
    return rows


def cli(argv: list[str]) -> int:
    """hbfungi's exit status (argparse refusals exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a named backbone is loaded."""
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(factory, "load_backbone", load)


def test_range_checks_refuse_nan_and_infinity():
    for value in (math.nan, math.inf, -math.inf):
        assert positive(value) and at_least(0)(value) and in_unit_interval(value)
        assert positive((0.25, value)) and at_least(1)([3, value])
    assert positive(0.5) is None and at_least(0)(0) is None and at_least(1)(["full", 5]) is None


@pytest.mark.parametrize("build, key", [
    (lambda: TransferOptions(temperature=math.nan), "transfer.temperature=nan"),
    (lambda: FungiOptions(tau=math.nan), "features.fungi.tau=nan"),
    (lambda: FungiOptions(grad_weight=math.inf), "features.fungi.grad_weight=inf"),
    (lambda: DinoOptions(global_scale=(math.nan, 1.0)), "features.dino.global_scale[0]=nan"),
    (lambda: RetrievalOptions(options={"nprobe": -math.inf}), "retrieval.options.nprobe=-inf"),
])
def test_sections_built_in_python_refuse_non_finite_numbers(build, key):
    with pytest.raises(ConfigError, match=re.escape(f"{key}: must be a finite number")):
        build()


SCHEMA_KEYS = [(schema, key, hint) for schema in PRESETS for key, hint in option_keys(schema, numeric=True)]


@pytest.mark.parametrize("schema, key, hint", SCHEMA_KEYS, ids=[f"{s.__name__}:{k}" for s, k, _ in SCHEMA_KEYS])
def test_every_numeric_option_refuses_nan_and_infinity(schema, key, hint, capsys):
    assert key in {row[0] for row in schema().describe()}
    values = list(NON_FINITE)
    if typing.get_origin(hint) in (tuple, list):  # also inside the list: [.nan, .nan]
        length = len(typing.get_args(hint)) if typing.get_origin(hint) is tuple else 1
        values += [f"[{', '.join([token] * length)}]" for token in NON_FINITE]
    for value in values:
        assert main(["config", "show", PRESETS[schema], f"{key}={value}"]) == 2, f"{key}={value} was accepted"
        assert key in capsys.readouterr().err


SECTION_KEYS = [(schema, key) for schema in PRESETS for key, _ in option_keys(schema, numeric=False)]


@pytest.mark.parametrize("schema, key", SECTION_KEYS, ids=[f"{s.__name__}:{k}" for s, k in SECTION_KEYS])
def test_a_section_is_never_null(schema, key, capsys):
    assert main(["config", "show", PRESETS[schema], f"{key}=null"]) == 2
    assert f"{key}=null: a section cannot be null" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="a section cannot be null"):
        schema.from_mapping(nest(key.split("."), None))


def test_null_section_in_python_is_refused():
    with pytest.raises(ConfigError, match="memory=null: a section cannot be null; set its keys, e.g. memory.size"):
        HbirdConfig(memory=None)


@pytest.mark.parametrize("override", ["transfer.temperature=.nan", "features.fungi.tau=.nan",
                                      "features.fungi.grad_weight=.inf", "memory=null"])
def test_hbird_refuses_before_the_model(override, tmp_path, no_model, capsys):
    root = make_folder_dataset(tmp_path / "toy")
    code = main(["hbird", "--out", str(tmp_path / "r.json"), "model.name=vit_tiny_patch16_224", "model.input_size=64",
                 "model.pretrained=false", "data.kind=folder", "data.train_split=train", "data.eval_split=val",
                 "data.num_workers=0", f"data.root={root}", "features.kind=fungi", override])
    assert code == 2 and override.split("=")[0] in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("data") / "toy")


FLAGS = [
    ("segment", "--grid-rows", "-1"), ("segment", "--backbone-option", "patch_size=0"),
    ("segment", "--backbone-option", "depth=abc"), ("segment", "--backbone-option", "mlp_ratio=.inf"),
    ("segment", "--memory-size", "-5"), ("segment", "--temperature", "nan"), ("segment", "--temperature", "inf"),
    ("segment", "--k", "0"), ("segment", "--batch-size", "0"), ("segment", "--augmentation-epochs", "-1"),
    ("segment", "--num-classes", "0"), ("segment", "--ignore-index", "-1"), ("segment", "--input-size", "0x64"),
    ("segment", "--seed", "-1"), ("segment", "--device", "gpu"), ("segment", "--backend", "nope"),
    ("segment", "--feature-option", "tau=.nan"), ("segment", "--whiten-dims", "0"), ("video", "--propagate", "-1"),
    ("video", "--radius", "-1"),
    ("video", "--temperature", "nan"), ("demo", "--temperature", "-inf"), ("demo", "--backbone-option", "depth=-1"),
]


@pytest.mark.parametrize("command, flag, value", FLAGS, ids=[" ".join(row) for row in FLAGS])
def test_flags_are_checked_before_the_model_and_named(command, flag, value, toy, tmp_path, no_model, capsys):
    inputs = {"segment": ["--examples", str(toy), "--images", str(toy / "images" / "val")],
              "video": ["--frames", str(toy / "images" / "val"), "--masks", str(toy / "annotations" / "val")],
              "demo": []}[command]
    assert cli([command, *inputs, "--out", str(tmp_path / "out"), *TINY, "--features", "fungi",
                f"{flag}={value}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # the error line, not the usage text
    assert flag in error and value in error


def test_timm_failures_on_backbone_options_name_them(toy, tmp_path, capsys):
    for options, named in (({"patch_size": 0}, "patch_size=0"), ({"depth": "abc"}, "depth='abc'"),
                           ({"embed_dim": 190}, "embed_dim=190")):  # 190 is no multiple of the 3 heads
        with pytest.raises(ConfigError, match=named):
            load_backbone("vit_tiny_patch16_224", pretrained=False, **options)
    assert cli(["segment", "--examples", str(toy), "--images", str(toy / "images" / "val"), "--out",
                str(tmp_path / "out"), *TINY, "--backbone-option", "embed_dim=190"]) == 2
    assert "embed_dim=190" in capsys.readouterr().err


def test_results_write_undefined_metrics_as_null_but_never_a_setting(tmp_path):
    written = write_json(tmp_path / "ok.json", {"miou": math.nan, "config": {"transfer": {"temperature": 0.02}}})
    assert json.loads(written.read_text()) == {"miou": None, "config": {"transfer": {"temperature": 0.02}}}
    for results, key in (({"miou": 0.5, "config": {"transfer": {"temperature": math.nan}}},
                          "config.transfer.temperature=nan"),
                         ({"segmenter": {"input_size": [64, math.inf]}}, r"segmenter.input_size\[1\]=inf")):
        with pytest.raises(ConfigError, match=key):
            write_json(tmp_path / "bad.json", results)
        assert not (tmp_path / "bad.json").exists()

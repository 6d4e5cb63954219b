"""Presets live in the top-level configs/ and ship inside the package: the loader finds both layouts."""

from pathlib import Path

import pytest

import hummingbird_fungi.config.loader as loader
from hummingbird_fungi.config.loader import preset_folder, presets

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def test_every_top_level_preset_is_found():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert files and not (ROOT / "hummingbird_fungi" / "configs").exists()  # moved, not copied
    assert preset_folder() == CONFIGS
    assert presets() == {path.stem: path for path in files}


def test_presets_inside_the_package_win(tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "hummingbird_fungi"  # the layout a wheel installs
    (package / "configs").mkdir(parents=True)
    (package / "configs" / "shipped.yaml").write_text("# a shipped preset\nseed: 1\n")
    (package.parent / "configs").mkdir()  # someone else's top-level folder is not ours
    (package.parent / "configs" / "stray.yaml").write_text("seed: 2\n")
    monkeypatch.setattr(loader, "PACKAGE", package)
    assert list(presets()) == ["shipped"]
    assert loader.read_preset("shipped") == {"seed": 1}


def test_pyproject_ships_the_presets_inside_the_package():
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"hummingbird_fungi.configs": "configs"}
    patterns = setuptools["package-data"]["hummingbird_fungi.configs"]
    shipped = {path for pattern in patterns for path in CONFIGS.glob(pattern)}
    assert shipped == set(CONFIGS.glob("*.yaml"))
    # the package list is written out (find cannot add a mapped folder): it must name every package folder
    folders = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "hummingbird_fungi").rglob("__init__.py")}
    assert set(setuptools["packages"]) == folders | {"hummingbird_fungi.configs"}

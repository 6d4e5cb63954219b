"""SIGKILL a `build-memory` build (a subprocess mid-build, or a forked build at an exact point: mid-shard, between
shards, while sealing; with a truncated shard or an edited mask before the rerun), resume it: the bank equals an
uninterrupted one, byte for byte."""

import importlib.util
from pathlib import Path
from signal import SIGKILL

import numpy as np
import pytest
from PIL import Image

from hummingbird_fungi.testing import make_folder_dataset

TOOL = Path(__file__).resolve().parents[1] / "tools" / "kill_resume_check.py"


def load_tool():
    """The kill/resume tool as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("kill_resume_check", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_killed_build_resumes_to_identical_files(tmp_path):
    tool = load_tool()
    args = tool.parse_args(["--images", "16", "--shard-images", "1", "--input-size", "112", "--kill-after", "2",
                            "--timeout", "120"])
    result = tool.check(tmp_path / "work", args)
    assert result["partial_exists"] and not result["bank_exists"]
    assert 2 <= result["shards_complete_at_kill"] < result["shards_total"] == 16
    assert result["shards_kept_by_resume"] == result["shards_complete_at_kill"]
    assert result["resume_logged"]
    assert result["comparison"]["identical"], result["comparison"]
    assert result["comparison"]["files"] == 2 * 16 + 1


POINTS = ["--images", "6", "--shard-images", "1", "--input-size", "64", "--kill-after", "2"]


@pytest.mark.parametrize("point, truncate", [("mid-shard", False), ("between-shards", True), ("sealing", False)])
def test_killed_at_a_point_resumes_to_identical_files(tmp_path, point, truncate):
    tool = load_tool()
    args = tool.parse_args(POINTS + ["--kill-at", point] + (["--truncate"] if truncate else []))
    result = tool.check(tmp_path / "work", args)
    assert result["partial_exists"] and not result["bank_exists"] and result["resume_logged"]
    assert result["comparison"]["identical"], result["comparison"]
    finished = {"mid-shard": 2, "between-shards": 3, "sealing": 6}[point]
    assert result["shards_complete_at_kill"] == finished
    if point == "mid-shard":  # the torn feature file of shard 2 was a temporary file, never a shard
        assert [name.split(".tmp-")[0] for name in result["temp_files_at_kill"]] == [".00002.features.npy"]
    if truncate:
        assert result["truncated"].endswith("00000.features.npy") and result["rebuilt_at_resume"] == ["00000"]
        assert result["shards_kept_by_resume"] == finished - 1
    else:
        assert result["rebuilt_at_resume"] == [] and result["shards_kept_by_resume"] == finished


def test_a_mask_edited_after_a_kill_gets_its_shard_rebuilt(tmp_path):
    tool = load_tool()
    args = tool.parse_args(POINTS)
    data, logs = make_folder_dataset(tmp_path / "data", n_train=6, n_val=0), tmp_path / "logs"
    logs.mkdir()
    bank = tmp_path / "bank"
    assert tool.run_forked(tool.build_args(data, bank, args), logs / "killed.log", "between-shards", 2) == -SIGKILL
    mask = data / "annotations" / "train" / "train000.png"
    edited = np.asarray(Image.open(mask)).copy()
    edited[:16] = 2
    Image.fromarray(edited).save(mask)
    assert tool.run_forked(tool.build_args(data, bank, args), logs / "resumed.log") == 0
    rebuilt = [line for line in (logs / "resumed.log").read_text().splitlines() if "rebuilding shard" in line]
    assert rebuilt and all("rebuilding shard 00000: its images or masks changed" in line for line in rebuilt)
    assert tool.run_forked(tool.build_args(data, tmp_path / "fresh", args), logs / "fresh.log") == 0
    assert tool.compare_trees(tmp_path / "fresh", bank)["identical"]

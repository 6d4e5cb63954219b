"""SIGKILL a `build-memory` subprocess mid-build, resume it: the bank equals an uninterrupted one, byte for byte."""

import importlib.util
from pathlib import Path

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

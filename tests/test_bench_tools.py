"""The bench tools run end to end in their tiny CPU modes: bench_eval (one variant in-process), bench_data, gpu_check
--tiny, bench_voc_scale --tiny and sweep_retrieval over a tiny built bank."""

import sys
from pathlib import Path

import pytest

from hummingbird_fungi.config.loader import load_config
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.eval.hbird import run_build_memory
from hummingbird_fungi.testing import make_folder_dataset
from optional_packages import requires_faiss

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import bench_data  # noqa: E402
import bench_eval  # noqa: E402
import bench_voc_scale  # noqa: E402
import gpu_check  # noqa: E402
import sweep_retrieval  # noqa: E402

TINY_MODEL = ["--model", "vit_tiny_patch16_224", "--size", "64", "--batch", "2"]


def test_bench_data_times_the_builders_data_side(tmp_path):
    root = bench_eval.write_synthetic_voc(tmp_path / "voc", train=3, val=1, size=64)
    for augment in (True, False):
        row = bench_data.measure(root, 64, augment, rows=4)
        assert row["augment"] == augment and row["images_per_s"] > 0 and row["labels_ms"] >= 0


def test_bench_eval_child_reports_every_phase_against_the_forward(tmp_path):
    root = bench_eval.write_synthetic_voc(tmp_path / "voc", train=3, val=2, size=64)
    args = bench_eval.parse_args(["--child", "plain", "--root", str(root), "--train", "3", "--val", "2",
                                  *TINY_MODEL, "--threads", "1"])
    row = bench_eval.run_child(args)
    assert set(row["seconds"]) == set(bench_eval.PHASES) and row["forward_s_per_img"] > 0
    assert row["bank_rows"] == 3 * 16 and row["peak_rss_gib"] > 0 and 0 <= row["miou"] <= 1
    assert row["backend"] in ("faiss", "torch") and row["rescore"] == "auto"
    assert "plain" in bench_eval.table([row])


def test_gpu_check_tiny_runs_every_check_on_the_cpu(capsys):
    assert gpu_check.main(["--tiny"]) == 0
    out = capsys.readouterr().out
    for name in ("torch_exact", "torch_stream", "faiss_gpu_flat", "features", "pipeline"):
        assert f'"check": "{name}"' in out
    assert "checks passed or skipped" in out


def test_gpu_check_without_cuda_says_so(monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_bench_voc_scale_tiny(tmp_path):
    result = bench_voc_scale.main(["--tiny", "--root", str(tmp_path / "voc"), "--distinct", "2"])
    assert result["train_images"] == 6 and result["bank_rows"] > 0 and result["seconds"]["total"] > 0
    assert (tmp_path / "voc" / "images" / "trainaug00005.jpg").stat().st_nlink == 3  # scene 1, ids 1, 3 and 5


def test_sweep_settings_are_parsed_and_bad_ones_named():
    setting = sweep_retrieval.parse_setting("pca16/faiss_ivfpq:nprobe=8,reorder=false,rerank=60")
    assert (setting.transform.dims, setting.transform.whiten, setting.backend, setting.options, setting.transfer) == (
        16, False, "faiss_ivfpq", {"nprobe": 8, "reorder": False}, {"rerank": 60})
    assert [sweep_retrieval.parse_setting(text).transform.dims for text in ("white/exact", "white32/exact")] == [None, 32]
    assert sweep_retrieval.parse_setting("white/exact").transform.whiten
    for bad in ("pcx/exact", "pca/exact", "white0/exact"):
        with pytest.raises(ConfigError, match="pca<d>"):
            sweep_retrieval.parse_setting(bad)
    with pytest.raises(ConfigError, match="nprob"):
        sweep_retrieval.parse_setting("torch:nprob=3")


@requires_faiss
def test_sweep_over_a_tiny_bank(tmp_path):
    root = make_folder_dataset(tmp_path / "data", n_train=4, n_val=2)
    overrides = ["model.name=vit_tiny_patch16_224", "model.pretrained=false", "model.input_size=[64,64]",
                 "data.kind=folder", "data.train_split=train", "data.eval_split=val", "data.num_workers=0",
                 f"data.root={root}", "memory.size=null", "retrieval.k=5", f"memory.path={tmp_path / 'bank'}"]
    run_build_memory(load_config(None, overrides))
    rows = sweep_retrieval.main([*overrides, "--threads", "1", "--recall-queries", "50", "--settings", "exact",
                                 "torch", "faiss_ivf:nlist=4,nprobe=4", "pca8/exact", "white8/faiss_ivf:nlist=4,nprobe=4"])
    exact, torch_row, ivf, pca, white = rows
    assert exact["recall@5"] == torch_row["recall@5"] == ivf["recall@5"] == 1.0  # all lists probed: exact
    assert abs(torch_row["delta_miou"]) <= 1e-3 and abs(ivf["delta_miou"]) <= 1e-3
    assert pca["index"]["backend"] in ("faiss", "torch") and pca["recall@5"] == 1.0  # exact in its own space
    assert white["recall@5"] == 1.0 and 0 <= white["miou"] <= 1

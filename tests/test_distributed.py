"""torchrun with 2 gloo processes on CPU gives the bank files and the metrics of a 1-process run.

Both runs use batch size 1 and one thread per process, so every image goes through the same
arithmetic whichever rank handles it; the metrics must then be equal, not just close.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from hummingbird_fungi.testing import make_folder_dataset

TINY = ["model.name=vit_tiny_patch16_224", "model.pretrained=false", "model.input_size=[64,64]",
        "data.kind=folder", "data.train_split=train", "data.eval_split=val", "data.num_workers=0",
        "data.batch_size=1", "memory.size=48", "memory.shard_images=3", "retrieval.k=5",
        "transfer.temperature=0.1"]
METRICS = ("miou", "miou_reference", "per_class_iou", "per_class_iou_reference", "pixel_accuracy",
           "num_eval_images")


def hbird_command(nproc: int, root: Path, bank: Path, out: Path) -> list[str]:
    """`hbird` on `nproc` torchrun processes (plain python for one)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    return [sys.executable, *launcher, "-m", "hummingbird_fungi", "hbird", "--device", "cpu", "--out", str(out), *TINY,
            f"data.root={root}", f"memory.path={bank}"]


def bank_files(bank: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file of a bank."""
    return {str(p.relative_to(bank)): p.read_bytes() for p in sorted(bank.rglob("*")) if p.is_file()}


def test_two_gloo_processes_match_one(tmp_path):
    root = make_folder_dataset(tmp_path / "toy", n_train=8, n_val=5)  # 3 shards and 5 eval images: uneven ranks
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {n: subprocess.Popen(hbird_command(n, root, tmp_path / f"bank{n}", tmp_path / f"out{n}.json"), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (1, 2)}
    logs = {n: run.communicate(timeout=300) for n, run in runs.items()}
    for n, run in runs.items():
        assert run.returncode == 0, logs[n][1][-3000:]
    assert "rank 1 of 2" in logs[2][1]
    one, two = (json.loads((tmp_path / f"out{n}.json").read_text()) for n in (1, 2))
    assert {key: two[key] for key in METRICS} == {key: one[key] for key in METRICS}
    assert one["num_eval_images"] == 5 and 0.0 < one["miou"] <= 1.0
    assert two["memory"] == one["memory"] and one["memory"]["rows"] == 48
    assert bank_files(tmp_path / "bank2") == bank_files(tmp_path / "bank1")

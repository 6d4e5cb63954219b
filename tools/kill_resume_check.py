"""Kill -9 a memory-bank build, resume it, and compare it byte for byte with an uninterrupted build.

Generates a small folder dataset, runs `python -m hummingbird_fungi build-memory` (tiny random
ViT, small shards, augmentation on) in a subprocess, sends SIGKILL once the first shards are on
disk, reruns the same command to resume, builds the same bank once more without interruption
(alongside, in parallel), and prints JSON: shards on disk at the kill, shards the resume kept
untouched, and whether every file of the two banks is identical.

    python tools/kill_resume_check.py --workdir /tmp/kill_resume
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from hummingbird_fungi.memory.bank import partial_path, read_manifest, shard_files, shard_name
from hummingbird_fungi.testing import make_folder_dataset

log = logging.getLogger("kill_resume_check")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (of `argv`, default sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kill_resume"), help="emptied and reused")
    parser.add_argument("--images", type=int, default=24, help="training images")
    parser.add_argument("--image-size", type=int, default=64,
                        help="side of the generated square toy scenes (at least 32)")
    parser.add_argument("--input-size", type=int, default=224, help="model input size (slows each shard down)")
    parser.add_argument("--shard-images", type=int, default=2)
    parser.add_argument("--kill-after", type=int, default=2, help="complete shards on disk before the SIGKILL")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for each build")
    return parser.parse_args(argv)


def build_command(data: Path, bank: Path, args: argparse.Namespace) -> list[str]:
    """The `build-memory` command line for `bank` (everything else fixed)."""
    return [sys.executable, "-m", "hummingbird_fungi", "build-memory", "--device", "cpu", "--seed", "0",
            "model.name=vit_tiny_patch16_224", "model.pretrained=false",
            f"model.input_size=[{args.input_size},{args.input_size}]",
            "data.kind=folder", f"data.root={data}", "data.train_split=train", "data.num_workers=0",
            "data.batch_size=2", f"memory.size={args.images * 20}", f"memory.shard_images={args.shard_images}",
            f"memory.path={bank}"]


def complete_shards(bank: Path, count: int) -> dict[str, int]:
    """Shards of an unfinished build with both files on disk: name -> mtime of its feature file (ns)."""
    shards = {}
    for name in map(shard_name, range(count)):
        feats, labels = shard_files(partial_path(bank), name)
        try:
            if labels.exists():
                shards[name] = feats.stat().st_mtime_ns
        except FileNotFoundError:  # not written yet, or renamed under us
            continue
    return shards


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two builds run side by side


def run_and_kill(command: list[str], bank: Path, shards: int, kill_after: int, timeout: float,
                 log_file: Path) -> dict[str, int]:
    """Start `command` (a build of `shards` shards), SIGKILL it once `kill_after` are complete; the shards then."""
    with open(log_file, "wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=ENV)
    deadline = time.monotonic() + timeout
    while len(complete_shards(bank, shards)) < kill_after:
        if process.poll() is not None:
            raise RuntimeError(f"the build ended (code {process.returncode}) before {kill_after} shards:\n"
                               f"{log_file.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"no {kill_after} shards within {timeout} s")
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = complete_shards(bank, shards)
    log.info("SIGKILL sent with %d complete shards on disk", len(done))
    return done


def run_to_end(command: list[str], timeout: float) -> str:
    """Run `command` to completion; its stderr (the log)."""
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout, text=True,
                          env=ENV)
    if done.returncode != 0:
        raise RuntimeError(f"build failed with code {done.returncode}:\n{done.stderr[-2000:]}")
    return done.stderr


def compare_trees(first: Path, second: Path) -> dict:
    """Relative file lists and bytes of two directories: counts, differing files, identical or not."""
    files = {p.relative_to(first) for p in first.rglob("*") if p.is_file()}
    other = {p.relative_to(second) for p in second.rglob("*") if p.is_file()}
    differ = sorted(str(rel) for rel in files & other if (first / rel).read_bytes() != (second / rel).read_bytes())
    only = sorted(str(rel) for rel in files ^ other)
    return {"files": len(files), "bytes": sum((first / rel).stat().st_size for rel in files),
            "differing": differ, "only_in_one": only, "identical": not differ and not only}


def check(workdir: Path, args: argparse.Namespace) -> dict:
    """Kill, resume and compare in `workdir`; the results dictionary."""
    shutil.rmtree(workdir, ignore_errors=True)
    data = make_folder_dataset(workdir / "data", n_train=args.images, n_val=0, size=(args.image_size,) * 2)
    full, resumed = workdir / "full", workdir / "resumed"
    shards = -(-args.images // args.shard_images)  # one pass (memory.augmentation_epochs=1)
    start = time.perf_counter()
    uninterrupted = subprocess.Popen(build_command(data, full, args), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=ENV)
    try:
        at_kill = run_and_kill(build_command(data, resumed, args), resumed, shards, args.kill_after, args.timeout,
                               workdir / "killed.log")
        killed_state = {"partial_exists": partial_path(resumed).is_dir(),
                        "bank_exists": resumed.exists()}
        resume_log = run_to_end(build_command(data, resumed, args), args.timeout)
        log.info("resumed build finished")
        if uninterrupted.wait(timeout=args.timeout) != 0:
            raise RuntimeError(f"the uninterrupted build failed with code {uninterrupted.returncode}")
    finally:
        if uninterrupted.poll() is None:
            uninterrupted.kill()
    manifest = read_manifest(resumed)
    kept = [name for name, mtime in at_kill.items()
            if shard_files(resumed, name)[0].stat().st_mtime_ns == mtime]
    return {"shards_total": len(manifest["shards"]), "rows": manifest["count"],
            "shards_complete_at_kill": len(at_kill), "shards_kept_by_resume": len(kept),
            **killed_state, "resume_logged": "resuming the memory-bank build" in resume_log,
            "comparison": compare_trees(full, resumed), "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    """Run the check and print its JSON; exit 1 unless the banks are identical."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args()
    results = check(args.workdir, args)
    print(json.dumps(results, indent=2))
    sys.exit(0 if results["comparison"]["identical"] else 1)


if __name__ == "__main__":
    main()

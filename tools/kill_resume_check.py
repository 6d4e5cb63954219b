"""Kill -9 a memory-bank build, resume it, and compare it byte for byte with an uninterrupted build.

Generates a small folder dataset and runs `hbfungi build-memory` (tiny random ViT, small shards,
augmentation on). `--kill-at running` (the default) starts `python -m hummingbird_fungi
build-memory` in a subprocess and sends SIGKILL once `--kill-after` shards are on disk, while the
same bank is built without interruption alongside. The other points kill a forked build at an
exact place by SIGKILLing itself there: `mid-shard` halfway through writing the feature file of
shard `--kill-after`, `between-shards` right after that shard is finished, `sealing` just before
the finished `.partial` directory is renamed into the bank. `--truncate` then cuts the first
finished shard's feature file in half, as a full disk or a crash of the storage could. The same
command is rerun to resume, and the tool prints JSON: shards finished at the kill, shards the
resume kept untouched, what it rebuilt, and whether every file of the two banks is identical.

    python tools/kill_resume_check.py --workdir /tmp/kill_resume [--kill-at sealing] [--truncate]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

import hummingbird_fungi.eval.hbird  # noqa: F401 - imported once here, not again in every forked build
import hummingbird_fungi.memory.bank as bank_module
import hummingbird_fungi.models.backbones  # noqa: F401 - likewise
from hummingbird_fungi.cli.main import main as hbfungi
from hummingbird_fungi.errors import DataError
from hummingbird_fungi.fileio import atomic_write
from hummingbird_fungi.memory.bank import partial_path, read_manifest, shard_files, shard_name, shard_record
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
    parser.add_argument("--kill-after", type=int, default=2,
                        help="running: finished shards on disk before the SIGKILL; other points: the shard number")
    parser.add_argument("--kill-at", choices=KILL_POINTS, default="running", help="where the build is killed")
    parser.add_argument("--truncate", action="store_true",
                        help="cut the first finished shard's feature file in half before resuming")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for each build")
    return parser.parse_args(argv)


KILL_POINTS = ("running", "mid-shard", "between-shards", "sealing")


def build_args(data: Path, bank: Path, args: argparse.Namespace) -> list[str]:
    """The `hbfungi build-memory` arguments for `bank` (everything else fixed)."""
    return ["build-memory", "--device", "cpu", "--seed", "0",
            "model.name=vit_tiny_patch16_224", "model.pretrained=false",
            f"model.input_size=[{args.input_size},{args.input_size}]",
            "data.kind=folder", f"data.root={data}", "data.train_split=train", "data.num_workers=0",
            "data.batch_size=2", f"memory.size={args.images * 20}", f"memory.shard_images={args.shard_images}",
            f"memory.path={bank}"]


def build_command(data: Path, bank: Path, args: argparse.Namespace) -> list[str]:
    """The `build-memory` command line for `bank` (everything else fixed)."""
    return [sys.executable, "-m", "hummingbird_fungi", *build_args(data, bank, args)]


def complete_shards(bank: Path, count: int) -> dict[str, int]:
    """Finished shards of an unfinished build (their record written, or listed by the final manifest of a build
    killed while sealing): name -> mtime of its feature file (ns)."""
    partial, shards = partial_path(bank), {}
    try:
        sealed = {shard["name"] for shard in read_manifest(partial, sealed=False).get("shards", [])}
    except DataError:  # no manifest yet, or renamed under us
        sealed = set()
    for name in map(shard_name, range(count)):
        try:
            if name in sealed or shard_record(partial, name).exists():
                shards[name] = shard_files(partial_path(bank), name)[0].stat().st_mtime_ns
        except FileNotFoundError:  # renamed under us
            continue
    return shards


def install_kill_hook(point: str, shard: int) -> None:
    """Make this process SIGKILL itself at `point` of a build (see the module docstring) around shard `shard`."""
    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    features = shard_files(Path(), shard_name(shard))[0].name
    if point == "mid-shard":
        save = bank_module.save_npy_atomic

        def torn(path: Path, array: np.ndarray) -> None:
            if path.name != features:
                return save(path, array)
            buffer = io.BytesIO()
            np.save(buffer, array)
            with atomic_write(path) as handle:
                handle.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
                handle.flush()
                die()
        bank_module.save_npy_atomic = torn
    elif point == "between-shards":
        write = bank_module.BankWriter.write_shard

        def write_then_die(self: bank_module.BankWriter, number: int, *rest, **options) -> None:
            write(self, number, *rest, **options)
            if number == shard:
                die()
        bank_module.BankWriter.write_shard = write_then_die
    elif point == "sealing":
        replace = os.replace

        def die_before_sealing(source, target, *rest, **options) -> None:
            if Path(source).name.endswith(".partial"):
                die()
            replace(source, target, *rest, **options)
        os.replace = die_before_sealing


def run_forked(argv: list[str], log_file: Path, point: str | None = None, shard: int = 0) -> int:
    """`hbfungi argv` in a forked child with one torch thread and its output in `log_file`, killed at `point` if
    given: its exit code, or minus the signal that ended it."""
    pid = os.fork()
    if pid == 0:  # the child never returns
        code = 1
        try:
            with open(log_file, "ab") as output:
                os.dup2(output.fileno(), 1)
                os.dup2(output.fileno(), 2)
            sys.stdout, sys.stderr = os.fdopen(1, "w", buffering=1), os.fdopen(2, "w", buffering=1)
            torch.set_num_threads(1)
            if point is not None:
                install_kill_hook(point, shard)
            code = hbfungi(argv)
        except BaseException:  # noqa: BLE001 - reported in the log, the exit code says it failed
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


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
    if args.kill_at != "running":
        return check_point(workdir, args)
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


def truncate_first_shard(bank: Path, count: int) -> str | None:
    """Cut the feature file of the first finished shard of an unfinished build (of `count`) in half; its path."""
    names = sorted(complete_shards(bank, count))
    if not names:
        return None
    file = shard_files(partial_path(bank), names[0])[0]
    with open(file, "r+b") as handle:
        handle.truncate(file.stat().st_size // 2)
    return str(file)


def check_point(workdir: Path, args: argparse.Namespace) -> dict:
    """Kill a forked build at `args.kill_at`, optionally truncate a shard, resume, and compare with an
    uninterrupted build."""
    shutil.rmtree(workdir, ignore_errors=True)
    data = make_folder_dataset(workdir / "data", n_train=args.images, n_val=0, size=(args.image_size,) * 2)
    full, resumed, logs = workdir / "full", workdir / "resumed", workdir / "logs"
    logs.mkdir()
    start = time.perf_counter()
    if run_forked(build_args(data, full, args), logs / "full.log") != 0:
        raise RuntimeError(f"the uninterrupted build failed:\n{(logs / 'full.log').read_text()[-2000:]}")
    code = run_forked(build_args(data, resumed, args), logs / "killed.log", args.kill_at, args.kill_after)
    if code != -signal.SIGKILL:
        raise RuntimeError(f"the build was not killed (code {code}):\n{(logs / 'killed.log').read_text()[-2000:]}")
    shards = -(-args.images // args.shard_images)
    state = {"partial_exists": partial_path(resumed).is_dir(), "bank_exists": resumed.exists(),
             "temp_files_at_kill": sorted(p.name for p in partial_path(resumed).rglob(".*.tmp-*")),
             "truncated": truncate_first_shard(resumed, shards) if args.truncate else None}
    at_kill = complete_shards(resumed, shards)
    if run_forked(build_args(data, resumed, args), logs / "resumed.log") != 0:
        raise RuntimeError(f"the resumed build failed:\n{(logs / 'resumed.log').read_text()[-2000:]}")
    resume_log = (logs / "resumed.log").read_text()
    kept = [name for name, mtime in at_kill.items() if shard_files(resumed, name)[0].stat().st_mtime_ns == mtime]
    return {"kill_at": args.kill_at, "shards_total": len(read_manifest(resumed)["shards"]),
            "shards_complete_at_kill": len(at_kill), "shards_kept_by_resume": len(kept),
            "rebuilt_at_resume": sorted({line.split("rebuilding shard ")[1].split(":")[0]
                                         for line in resume_log.splitlines() if "rebuilding shard " in line}),
            **state, "resume_logged": "resuming the memory-bank build" in resume_log,
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

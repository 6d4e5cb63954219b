"""Benchmark the whole Hummingbird evaluation per phase, as a ratio to a bare forward pass in the same process.

Writes a synthetic Pascal VOC (flat layout: toy street scenes of 3 classes plus void, JPEG images,
`--train` trainaug and `--val` val images at `--size` px) and runs `run_hbird` (what `hbfungi hbird`
runs) with a seeded random ViT-S/16 (`dino_vits16`, pretrained=false: speed does not depend on the
weights), unbounded memory, no augmentation epochs beyond one, data workers 0 (so every step is in
this process), once per variant, each in its own process:

* `plain`: patch embeddings;
* `fungi`: patch FUNGI at its defaults;
* `paper`: the FUNGI paper's recipe: dense projection, support negatives, gradient at attn.proj.

FUNGI variants run at the default `features.fungi.gradient_dtype=auto`: the gradient half's matmuls (the
backward after the layer, the projection) in bf16 where they are native (AMX CPUs, GPUs; the reference ran
under fp16 autocast); append `features.fungi.gradient_dtype=float32` for fp32.

Each child first times a bare forward pass (no-grad embeddings of `--batch` random images at a
time, best of two passes) and reports every phase in seconds and as a ratio to forward seconds x
images (memory images + evaluation images): bank (decode, augment, forward, sample, write),
index, query data (decode and transform of the evaluation images), query forward, search,
transfer (cosines, soft labels, vote), upsample, confusion, total; the query side (search +
transfer + upsample) per evaluation image; and the peak RSS of the child. With `--clock process`
(default) the package's timers read this process's CPU time (`time.process_time`), robust to
other load with `--threads 1`.

    python tools/bench_eval.py --train 48 --val 16 --size 512 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from bench_features import add_clock_arguments, emit_json, package_clock, run_pass, set_threads
from bench_large_bank import peak_rss_gib
from hummingbird_fungi.config.loader import load_config
from hummingbird_fungi.eval.hbird import run_hbird
from hummingbird_fungi.features import EmbeddingFeatures
from hummingbird_fungi.models.factory import create_encoder
from hummingbird_fungi.testing import VOID, make_scene

log = logging.getLogger("bench_eval")

VARIANTS = {
    "plain": ["features.kind=embeddings"],
    "fungi": ["features.kind=fungi"],
    "paper": ["features.kind=fungi", "features.fungi.projection=dense", "features.fungi.negatives=support",
              "features.fungi.layer=blocks.-1.attn.proj"],
}
PHASES = ("bank", "index", "query_data", "query_forward", "search", "transfer", "upsample", "confusion", "total")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=48, help="memory (trainaug) images")
    parser.add_argument("--val", type=int, default=16, help="evaluation images")
    parser.add_argument("--size", type=int, default=512, help="square image and network input size (px)")
    parser.add_argument("--batch", type=int, default=8, help="data.batch_size")
    parser.add_argument("--model", default="dino_vits16", help="model.name (random weights)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--root", type=Path, default=None, help="where the synthetic VOC goes (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", choices=sorted(VARIANTS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="more config overrides, e.g. retrieval.backend=torch")
    add_clock_arguments(parser, default_clock="process")
    return parser.parse_args(argv)


def write_synthetic_voc(root: Path, train: int, val: int, size: int, seed: int = 0,
                        distinct: int | None = None) -> Path:
    """A VOC flat layout of toy street scenes (`testing.make_scene`, void as 255) under `root`; with `distinct`,
    only that many scenes per split are drawn and the other ids are hard links to them (fast at VOC scale)."""
    rng = np.random.default_rng(seed)
    for folder in ("images", "SegmentationClassAug", "SegmentationClass", "sets"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, count in (("trainaug", train), ("val", val)):
        ids = [f"{split}{i:05d}" for i in range(count)]
        folder = "SegmentationClass" if split == "val" else "SegmentationClassAug"
        for i, name in enumerate(tqdm(ids, desc=f"synthetic VOC {split}", unit="img", disable=count < 1000)):
            files = root / "images" / f"{name}.jpg", root / folder / f"{name}.png"
            if distinct is not None and i >= distinct:
                for file, first in zip(files, (root / "images" / f"{ids[i % distinct]}.jpg",
                                               root / folder / f"{ids[i % distinct]}.png")):
                    os.link(first, file)
                continue
            image, mask = make_scene(rng, (size, size))
            mask[mask == VOID] = 255
            Image.fromarray(image).save(files[0], quality=90)
            Image.fromarray(mask).save(files[1])
        (root / "sets" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def forward_seconds(args: argparse.Namespace) -> float:
    """Best seconds per image (of two passes after a warm-up) of a bare no-grad forward at the input size."""
    encoder = create_encoder(args.model, pretrained=False, device=torch.device("cpu"), seed=0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    extractor = EmbeddingFeatures(encoder)
    run_pass(extractor, images[:1], 1, None)
    passes = [run_pass(extractor, images, args.batch, None) for _ in range(2)]
    return min(p[0] if args.clock == "wall" else p[1] for p in passes)


def phases(timings: dict[str, float]) -> dict[str, float]:
    """Seconds per phase from the run's timings (query data: the evaluation loop's remainder)."""
    loop = {name: timings.get(f"{name}_s", 0.0) for name in ("query_features", "search", "vote", "upsample",
                                                                "confusion")}
    return {"bank": timings.get("build_memory_s", 0.0) + timings.get("support_bank_s", 0.0),
            "index": timings["build_index_s"],
            "query_data": timings["evaluate_s"] - loop["query_features"] - loop["vote"] - loop["upsample"]
            - loop["confusion"],
            "query_forward": loop["query_features"], "search": loop["search"],
            "transfer": loop["vote"] - loop["search"], "upsample": loop["upsample"],
            "confusion": loop["confusion"], "total": timings["total_s"]}


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this process: forward reference, the evaluation, phases, ratios and peak RSS."""
    set_threads(args.threads)
    forward = forward_seconds(args)
    config = load_config(None, [
        f"model.name={args.model}", "model.pretrained=false", f"model.input_size=[{args.size},{args.size}]",
        "data.kind=voc", f"data.root={args.root}", "data.train_split=trainaug", "data.eval_split=val",
        "data.num_workers=0", f"data.batch_size={args.batch}", "memory.size=null", "memory.augmentation_epochs=1",
        *VARIANTS[args.child], *args.overrides])
    with package_clock(args.clock):
        results = run_hbird(config)
    seconds = phases(results["timings"])
    images = args.train * config.memory.augmentation_epochs + args.val
    return {"variant": args.child, "clock": args.clock, "threads": torch.get_num_threads(),
            "backend": results["index"]["backend"], "rescore": config.transfer.rescore,
            "bank_rows": results["memory"]["rows"], "forward_s_per_img": round(forward, 4),
            "seconds": {name: round(value, 3) for name, value in seconds.items()},
            "ratio": {name: round(value / (forward * images), 3) for name, value in seconds.items()},
            "query_side_s_per_img": round((seconds["search"] + seconds["transfer"] + seconds["upsample"])
                                          / args.val, 4),
            "miou": round(results["miou"], 4), "peak_rss_gib": peak_rss_gib()}


def child_command(args: argparse.Namespace, variant: str) -> list[str]:
    """The command line of one variant's child process."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--root", str(args.root),
               "--train", str(args.train), "--val", str(args.val), "--size", str(args.size), "--batch",
               str(args.batch), "--model", args.model, "--clock", args.clock]
    return command + (["--threads", str(args.threads)] if args.threads else []) + args.overrides


def table(rows: list[dict[str, Any]]) -> str:
    """Phases as rows, variants as columns: seconds (ratio to forward)."""
    lines = [f"{'phase':<22}" + "".join(f"{row['variant']:>20}" for row in rows)]
    for name in PHASES:
        lines.append(f"{name:<22}" + "".join(f"{row['seconds'][name]:>11.2f}s ({row['ratio'][name]:>5.2f}x)"
                                             for row in rows))
    for key in ("query_side_s_per_img", "forward_s_per_img", "peak_rss_gib", "miou"):
        lines.append(f"{key:<22}" + "".join(f"{row[key]:>20}" for row in rows))
    return "\n".join(lines)


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Write the data (unless present) and run every variant in a child process."""
    if not (args.root / "sets" / "val.txt").is_file():
        write_synthetic_voc(args.root, args.train, args.val, args.size)
    rows = []
    for variant in args.variants:
        log.info("variant %s", variant)
        done = subprocess.run(child_command(args, variant), check=True, stdout=subprocess.PIPE, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark; print the table and the JSON rows."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        args.root = args.root or Path(scratch) / "voc"
        rows = run_all(args)
    print(table(rows))
    emit_json(rows, args.json)


if __name__ == "__main__":
    main()

"""Time a VOC-sized evaluation on synthetic images: preset voc_dino_vits16_mem1e4 (memory 1024 x 10^4 rows).

Writes a synthetic Pascal VOC of `--train` trainaug (default 10,582, as VOC + SBD) and `--val`
(1,449) images at 512 px (`bench_eval.write_synthetic_voc`: `--distinct` scenes drawn per split,
the other ids hard links to them), then runs the preset through `run_hbird` (what `hbfungi hbird`
runs) with random weights and prints the phases of tools/bench_eval.py in seconds, images per
second and the peak RSS. Meant for a GPU machine; `--tiny` runs a few 64 px images with a tiny
ViT on the CPU (a dry run).

    python tools/bench_voc_scale.py --root /tmp/voc_synth                 # GPU: the full size
    python tools/bench_voc_scale.py --tiny                                # CPU dry run
    python tools/bench_voc_scale.py --root DIR retrieval.backend=faiss    # any override
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_eval import phases, write_synthetic_voc
from bench_features import emit_json, set_threads
from bench_large_bank import peak_rss_gib
from hummingbird_fungi.config.loader import load_config, presets
from hummingbird_fungi.eval.hbird import run_hbird

log = logging.getLogger("bench_voc_scale")

PRESET = "voc_dino_vits16_mem1e4"
TINY = ["model.name=vit_tiny_patch16_224", "model.input_size=[64,64]", "memory.size=256", "data.num_workers=0",
        "device=cpu"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="synthetic VOC folder (reused when present; "
                                                                 "default: a temp dir)")
    parser.add_argument("--train", type=int, default=10582, help="trainaug images")
    parser.add_argument("--val", type=int, default=1449, help="val images")
    parser.add_argument("--size", type=int, default=512, help="synthetic image size (px)")
    parser.add_argument("--distinct", type=int, default=256, help="distinct scenes drawn per split")
    parser.add_argument("--threads", type=int, default=None, help="torch (and faiss) threads; default: all")
    parser.add_argument("--tiny", action="store_true", help="6 + 2 images at 64 px, a tiny ViT, on the CPU")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. device=cuda retrieval.backend=faiss")
    args = parser.parse_args(argv)
    if args.tiny:
        args.train, args.val, args.size, args.overrides = 6, 2, 64, TINY + args.overrides
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Write the data unless present, run the preset, and collect phases, throughput and peak RSS."""
    if not (args.root / "sets" / "val.txt").is_file():
        start = time.perf_counter()
        write_synthetic_voc(args.root, args.train, args.val, args.size, distinct=args.distinct)
        log.info("wrote the synthetic VOC in %.1f s", time.perf_counter() - start)
    config = load_config(presets()[PRESET], ["model.pretrained=false", f"data.root={args.root}", *args.overrides])
    results = run_hbird(config)
    timings = results["timings"]
    images = args.train * config.memory.augmentation_epochs + args.val
    return {"preset": PRESET, "overrides": args.overrides, "train_images": args.train, "val_images": args.val,
            "bank_rows": results["memory"]["rows"], "index": results["index"],
            "seconds": {name: round(value, 2) for name, value in phases(timings).items()},
            "images_per_s": round(images / timings["total_s"], 2), "eval_images_per_s":
            round(results["eval_images_per_s"], 2), "miou": round(results["miou"], 4),
            "peak_rss_gib": peak_rss_gib()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print (and return) its JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        args.root = args.root or Path(scratch) / "voc"
        result = run(args)
    emit_json(result, args.json)
    return result


if __name__ == "__main__":
    main()

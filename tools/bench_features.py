"""Benchmark patch features: seconds per image for a plain forward and FUNGI variants, with step shares.

Per image means one HxW image passed in batches of `--batch`, with features for all its
patches; variants ending in `_select<n>` project only n random patches per image, as when a
memory bank keeps n of them (forward and loss still use the whole image). Every variant is
timed in `--rounds` interleaved rounds and its best round is reported, so load from other
processes inflates no single variant; on a shared machine `--clock process --threads 1`
counts only this process's CPU seconds. Ratios are to the plain forward (`embeddings`
features: one no-grad forward), which FUNGI's own forward replaces. Step shares are
fractions of a variant's best round: forward (the no-grad backbone pass plus the recorded
tail after the gradient layer), negatives (support search, gather, head), loss_backward
(loss and the tail backward), projection, other. `fungi_structured_none` is the default patch FUNGI
(projection products in bf16 where matmuls run natively in bf16, `gradient_dtype=auto`);
`fungi_structured_none_fp32` forces fp32 products.

    python tools/bench_features.py --backbone dinov2_vits14 --weights FILE --size 336x448
    python tools/bench_features.py --backbone dino_vits16 --random-weights --size 512x512 --clock process --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch

from hummingbird_fungi.config.schema import parse_size
from hummingbird_fungi.data.transforms import EvalTransform, read_image
from hummingbird_fungi.features import EmbeddingFeatures, FungiPatchFeatures, PatchFeatures
from hummingbird_fungi.models.backbones import load_backbone
from hummingbird_fungi.models.encoders import Encoder
from hummingbird_fungi.runtime import synchronize
from hummingbird_fungi.segment.folders import list_images

log = logging.getLogger("bench_features")


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--weights", default=None, help="local state dict; default: the hub weights")
    parser.add_argument("--random-weights", action="store_true",
                        help="random backbone weights (speed does not depend on them; no download)")
    parser.add_argument("--size", default="336x448", help="HxW input size (height first)")
    parser.add_argument("--images", type=int, default=4, help="timed images per variant and round")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best is kept")
    parser.add_argument("--images-dir", default=None, help="real images (any image file) instead of random ones")
    parser.add_argument("--support-images", type=int, default=16,
                        help="images whose patch embeddings form the support set of the negatives variant")
    parser.add_argument("--select", type=int, default=32, help="patches per image for the _select variant")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="time only these variants (and the plain forward); default: all")
    add_clock_arguments(parser, default_clock="wall")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def add_clock_arguments(parser: argparse.ArgumentParser, default_clock: str) -> None:
    """--threads and --clock, shared by the bench tools."""
    parser.add_argument("--threads", type=int, default=None, help="torch (and faiss) threads; default: all")
    parser.add_argument("--clock", choices=("wall", "process"), default=default_clock,
                        help="wall time, or this process's CPU time (robust to other load with --threads 1)")


def package_clock(clock: str) -> contextlib.AbstractContextManager:
    """While active, timers reading `time.perf_counter` (the package's `runtime.timed` among them) read this
    process's CPU time with clock 'process'; wall time otherwise."""
    return mock.patch("time.perf_counter", time.process_time) if clock == "process" else contextlib.nullcontext()


def emit_json(result: Any, path: Path | None) -> None:
    """Print `result` as indented JSON, and write it to `path` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if path is not None:
        path.write_text(text)


def set_threads(threads: int | None) -> None:
    """Use `threads` torch and faiss (when installed) threads; None leaves the defaults."""
    if not threads:
        return
    torch.set_num_threads(threads)
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(threads)


def load_images(count: int, height: int, width: int, images_dir: str | None, seed: int) -> torch.Tensor:
    """`count` normalised images (count, 3, H, W): random, or consecutive files of `images_dir` (ImageNet stats)."""
    if images_dir is None:
        return torch.randn(count, 3, height, width, generator=torch.Generator().manual_seed(seed))
    files = list_images(images_dir)[0]
    if len(files) < count:
        raise SystemExit(f"{images_dir} has {len(files)} images, {count} needed")
    start = (seed * count) % (len(files) - count + 1)
    transform = EvalTransform((height, width), normalize="imagenet")
    return torch.stack([transform(read_image(p))[0] for p in files[start:start + count]])  # (B, 3, H, W)


def run_pass(extractor: PatchFeatures, images: torch.Tensor, batch: int,
             select: int | None) -> tuple[float, float]:
    """Wall and process seconds per image of one pass of `extractor` over `images` in batches."""
    grid = extractor.encoder.grid_size(*images.shape[-2:])
    num_patches = grid[0] * grid[1]
    generator = torch.Generator().manual_seed(0)
    synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        ids = None if select is None else torch.stack(
            [torch.randperm(num_patches, generator=generator)[:select] for _ in range(len(chunk))])  # (b, n)
        extractor(chunk, ids)
    synchronize()
    return (time.perf_counter() - start) / len(images), (time.process_time() - start_cpu) / len(images)


def step_shares(step_times: dict[str, float], seconds: float) -> dict[str, float]:
    """Fractions of a pass's `seconds` spent in each recorded step, plus 'other'."""
    shares = {step: round(t / seconds, 4) for step, t in step_times.items()}
    shares["other"] = round(max(0.0, 1.0 - sum(shares.values())), 4)
    return shares


def support_set(encoder: Encoder, images: torch.Tensor, batch: int) -> torch.Tensor:
    """Unit-norm patch embeddings (M, E) of `images`, the support set for negatives."""
    embed = EmbeddingFeatures(encoder)
    return torch.cat([embed(images[i:i + batch]).flatten(0, 1) for i in range(0, len(images), batch)])


def make_variants(encoder: Encoder, args: argparse.Namespace,
                  support_images: torch.Tensor) -> dict[str, tuple[PatchFeatures, int | None]]:
    """The timed extractors by result name (those of `--variants`, and `forward`), with their per-image patch
    selection (None: all)."""
    shared_dense = functools.cache(lambda: FungiPatchFeatures(encoder, projection="dense"))  # one P for both

    def with_support() -> FungiPatchFeatures:
        extractor = FungiPatchFeatures(encoder, negatives="support")
        extractor.set_support(support_set(encoder, support_images, args.batch))
        return extractor

    factories: dict[str, tuple[Callable[[], PatchFeatures], int | None]] = {
        "forward": (lambda: EmbeddingFeatures(encoder), None),
        "fungi_structured_none": (lambda: FungiPatchFeatures(encoder, projection="structured"), None),
        "fungi_structured_none_fp32": (lambda: FungiPatchFeatures(encoder, gradient_dtype="float32"), None),
        "fungi_dense_none": (shared_dense, None),
        f"fungi_dense_none_select{args.select}": (shared_dense, args.select),
        "fungi_structured_support": (with_support, None),
        # the variants of tools/fungi_study.py (structured projection, no negatives)
        "fungi_kl": (lambda: FungiPatchFeatures(encoder, objective="kl"), None),
        "fungi_dino": (lambda: FungiPatchFeatures(encoder, objective="dino"), None),
        "fungi_fc2": (lambda: FungiPatchFeatures(encoder, layer="blocks.-1.mlp.fc2"), None),
        "fungi_qkv": (lambda: FungiPatchFeatures(encoder, layer="blocks.-1.attn.qkv"), None),
        "fungi_proj_4th_last_block": (lambda: FungiPatchFeatures(encoder, layer="blocks.-4.attn.proj"), None),
    }
    chosen = ["forward"] + [name for name in args.variants or factories if name != "forward"]
    unknown = sorted(set(chosen) - set(factories))
    if unknown:
        raise SystemExit(f"unknown --variants {unknown}; choose from {sorted(factories)}")
    return {name: (factories[name][0](), factories[name][1]) for name in chosen}


def time_variants(variants: dict[str, tuple[PatchFeatures, int | None]], images: torch.Tensor,
                  args: argparse.Namespace) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Best seconds per image of every variant over interleaved rounds, and step shares of FUNGI ones."""
    best = {name: math.inf for name in variants}
    shares: dict[str, dict[str, float]] = {}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for name, (extractor, select) in variants.items():
            if isinstance(extractor, FungiPatchFeatures):
                extractor.step_times = {}
            wall, process = run_pass(extractor, images, args.batch, select)
            seconds = wall if args.clock == "wall" else process
            if round_index > 0 and seconds < best[name]:
                best[name] = seconds
                if isinstance(extractor, FungiPatchFeatures):  # step times are wall seconds
                    shares[name] = step_shares(extractor.step_times or {}, wall * len(images))
        log.info("round %d: %s", round_index, {name: round(s, 3) for name, s in best.items()})
    return best, shares


def benchmark(encoder: Encoder, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Best seconds per image, ratio to the plain forward and step shares of every variant."""
    height, width = parse_size(args.size)
    grid = encoder.grid_size(height, width)
    patches = grid[0] * grid[1]
    images = load_images(args.images, height, width, args.images_dir, seed=0).to(device)
    support_images = load_images(args.support_images, height, width, args.images_dir, seed=1).to(device)
    best, shares = time_variants(make_variants(encoder, args, support_images), images, args)
    result: dict[str, Any] = {
        "backbone": args.backbone, "size": f"{width}x{height}", "device": str(device),
        "threads": torch.get_num_threads(), "images": args.images, "batch": args.batch, "rounds": args.rounds,
        "clock": args.clock, "patches_per_img": patches, "support_rows": args.support_images * patches,
    }
    for name, seconds in best.items():
        result[f"{name}_s_per_img"] = round(seconds, 4)
        if name != "forward":
            result[f"{name}_ratio"] = round(seconds / best["forward"], 3)
            result[f"{name}_steps"] = shares[name]
    return result


def main() -> None:
    """Time the variants and print one JSON object."""
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_threads(args.threads)
    device = torch.device(args.device)
    pretrained = args.weights is None and not args.random_weights
    encoder = load_backbone(args.backbone, weights=args.weights, pretrained=pretrained, device=device)
    print(json.dumps(benchmark(encoder, args, device), indent=2))


if __name__ == "__main__":
    main()

"""`hbfungi segment` and `hbfungi demo`: segment a folder of images from annotated examples or a saved bank."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from hummingbird_fungi.config.loader import deep_merge, input_size, nest, parse_override
from hummingbird_fungi.data.segmentation import IMAGE_EXTENSIONS, read_folder_info
from hummingbird_fungi.errors import ConfigError, DataError
from hummingbird_fungi.eval.metrics import ConfusionMatrix, pixel_accuracy
from hummingbird_fungi.segment.segmenter import InContextSegmenter
from hummingbird_fungi.data.transforms import read_image, read_mask
from hummingbird_fungi.segment.visualize import overlay, overlay_grid, plot_miou_vs_memory, plot_per_class_iou

log = logging.getLogger(__name__)

DEMO_BACKBONE = "vit_tiny_patch16_224"
DEMO_BACKBONE_KWARGS = {"patch_size": 8, "depth": 4}
DEMO_LONG_SIDE = 224
Failure = dict[str, str]


# --------------------------------------------------------------------------- folders


def list_images(folder: str | Path) -> tuple[list[Path], list[Failure], list[str]]:
    """(image files sorted by name, duplicate-stem failures, names of non-image files) of a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist or is not a directory")
    files, failed, ignored, stems = [], [], [], {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            ignored.append(path.name)
        elif path.stem in stems:
            failed.append({"file": str(path),
                           "error": f"same stem as {stems[path.stem]}; its mask would be overwritten"})
        else:
            stems[path.stem] = path.name
            files.append(path)
    if ignored:
        log.info("ignoring %d files without an image extension in %s: %s", len(ignored), folder, ignored[:5])
    return files, failed, ignored


def masks_by_stem(folder: str | Path | None) -> dict[str, Path] | None:
    """stem -> <folder>/<stem>.png of a mask folder (None without a folder)."""
    if folder is None:
        return None
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"mask folder {folder} does not exist or is not a directory")
    return {p.stem: p for p in sorted(folder.glob("*.png"))}


def example_pairs(folder: str | Path) -> tuple[list[Path], list[Path], list[Failure]]:
    """Readable (image, mask) pairs of `<folder>/images/*` and `<folder>/masks/<stem>.png`; failures named."""
    folder = Path(folder)
    files, failed, _ = list_images(folder / "images")
    masks = masks_by_stem(folder / "masks")
    images, labels = [], []
    for path in files:
        mask = masks.get(path.stem)
        try:
            if mask is None:
                raise DataError(f"example {path} has no mask {folder / 'masks' / (path.stem + '.png')}")
            read_image(path)
            read_mask(mask)
        except DataError as exc:
            log.warning("skipping example: %s", exc)
            failed.append({"file": str(path), "error": str(exc)})
            continue
        images.append(path)
        labels.append(mask)
    if not images:
        raise DataError(f"no readable example pairs in {folder} (expected images/<stem>.* and masks/<stem>.png)")
    return images, labels, failed


def write_mask(path: Path, mask: np.ndarray) -> None:
    """Single-channel PNG of class ids (8-bit, or 16-bit for uint16 masks)."""
    Image.fromarray(mask).save(path)


# --------------------------------------------------------------------------- segmenting a folder


def score_image(segmenter: InContextSegmenter, pred: np.ndarray, gt_path: Path,
                total: ConfusionMatrix) -> tuple[dict[str, Any], np.ndarray | None]:
    """Add one prediction to the running confusion matrix: (its pixel accuracy or the problem, the gt)."""
    try:
        gt = read_mask(gt_path)
    except DataError as exc:
        log.warning("no metrics for %s: %s", gt_path.stem, exc)
        return {"ground_truth_error": str(exc)}, None
    if gt.shape != pred.shape:
        problem = f"ground truth {gt_path} is {gt.shape[1]}x{gt.shape[0]}, the image {pred.shape[1]}x{pred.shape[0]}"
        log.warning("no metrics for %s: %s", gt_path.stem, problem)
        return {"ground_truth_error": problem}, None
    cm = segmenter.confusion_matrix()
    cm.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt))
    total.merge(cm)
    return {"ground_truth": str(gt_path), "pixel_accuracy": pixel_accuracy(cm.matrix)}, gt


def segment_files(segmenter: InContextSegmenter, files: Sequence[Path], out: str | Path,
                  ground_truth: dict[str, Path] | None = None, batch_size: int = 4,
                  grid_rows: int = 6) -> dict[str, Any]:
    """Segment `files` into `<out>/masks/<stem>.png` and `<out>/overlays/<stem>.png`; draw the grid
    (`grid_rows` images spread evenly over the list) to `<out>/grid.png`.

    Unreadable images are logged and listed under `failed`; with ground truth (stem -> mask file)
    the result holds the metrics and `<out>/per_class_iou.png` is drawn.
    """
    out = Path(out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    total = segmenter.confusion_matrix() if ground_truth is not None else None
    records: list[dict[str, Any]] = []
    failed: list[Failure] = []
    rows: list[dict[str, Any]] = []
    shown = {files[i] for i in np.linspace(0, len(files) - 1, min(grid_rows, len(files))).round().astype(int)}
    start = time.perf_counter()
    with tqdm(total=len(files), desc="segment", unit="img") as progress:
        for first in range(0, len(files), batch_size):
            loaded = []
            for path in files[first:first + batch_size]:
                try:
                    loaded.append((path, read_image(path)))
                except DataError as exc:
                    log.warning("skipping %s: %s", path.name, exc)
                    failed.append({"file": str(path), "error": str(exc)})
            preds = segmenter.predict_batch([image for _, image in loaded], batch_size) if loaded else []
            for (path, image), pred in zip(loaded, preds):
                write_mask(out / "masks" / f"{path.stem}.png", pred)
                Image.fromarray(overlay(image, pred, segmenter.num_classes)).save(out / "overlays" / f"{path.stem}.png")
                record: dict[str, Any] = {"file": str(path), "mask": f"masks/{path.stem}.png",
                                          "overlay": f"overlays/{path.stem}.png", "size": list(pred.shape)}
                gt = None
                if ground_truth is not None and path.stem in ground_truth:
                    scores, gt = score_image(segmenter, pred, ground_truth[path.stem], total)
                    record.update(scores)
                if path in shown:
                    accuracy = record.get("pixel_accuracy")
                    label = path.stem if accuracy is None else f"{path.stem}\npixel acc {100 * accuracy:.1f}%"
                    rows.append({"image": image, "pred": pred, "gt": gt, "name": label})
                records.append(record)
            progress.update(len(files[first:first + batch_size]))
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {"num_images": len(files), "num_segmented": len(records), "images": records,
                              "failed": failed, "seconds": seconds,
                              "images_per_s": len(records) / max(seconds, 1e-9)}
    if rows:
        result["grid"] = str(overlay_grid(rows, out / "grid.png", segmenter.class_names).relative_to(out))
    if total is not None and int(total.matrix.sum()) > 0:
        result["metrics"] = segmenter.metrics(total)
        plot_per_class_iou(result["metrics"]["per_class_iou"], out / "per_class_iou.png",
                           title=f"per-class IoU (mIoU {100 * result['metrics']['miou']:.1f}%)")
        result["per_class_plot"] = "per_class_iou.png"
    if failed:
        log.warning("%d of %d images could not be segmented: %s", len(failed), len(files),
                    ", ".join(Path(f["file"]).name for f in failed))
    return result


def memory_sweep(build: Callable[[int | None], InContextSegmenter], images: Sequence[Path],
                 masks: Sequence[Path], sizes: Sequence[int | None], batch_size: int = 4) -> list[dict[str, Any]]:
    """mIoU of the segmenters `build(memory_size)` for each size: [{"memory_size", "rows", "miou"}]."""
    points = []
    for size in sizes:
        segmenter = build(size)
        metrics = segmenter.evaluate(list(images), list(masks), batch_size)
        points.append({"memory_size": size, "rows": segmenter.bank.count, "miou": metrics["miou"]})
        log.info("memory size %s: %d rows, mIoU %.2f", size, segmenter.bank.count, 100 * metrics["miou"])
    return points


# --------------------------------------------------------------------------- arguments


def key_values(pairs: Sequence[str] | None) -> dict[str, Any]:
    """Repeated KEY=VALUE options (dotted keys nest, values parsed as YAML) -> dict."""
    out: dict[str, Any] = {}
    for text in pairs or []:
        keys, value = parse_override(text)
        out = deep_merge(out, nest(keys, value), strict=False)
    return out


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Backbone, features, retrieval and batching options shared by `segment` and `demo`."""
    parser.add_argument("--backbone", help="backbone name, e.g. dinov2_vits14, dino_vits16 (default: the bank's, "
                                           "else dinov2_vits14)")
    parser.add_argument("--weights", type=Path, help="local checkpoint (timm or original FAIR layout)")
    parser.add_argument("--random-init", action="store_true", help="no pretrained weights (smoke tests only)")
    parser.add_argument("--backbone-option", action="append", metavar="KEY=VALUE",
                        help="timm model keyword, e.g. depth=4 (repeatable)")
    parser.add_argument("--features", choices=("embeddings", "fungi"), default="embeddings",
                        help="patch features: plain embeddings or FUNGI (default embeddings)")
    parser.add_argument("--feature-option", action="append", metavar="KEY=VALUE",
                        help="FUNGI option, e.g. negatives=support (repeatable)")
    parser.add_argument("--input-size", help="network input WxH, multiples of the patch (default: long side 448, "
                                             "the examples' aspect)")
    parser.add_argument("--k", type=int, default=30, help="neighbours per patch (default 30)")
    parser.add_argument("--temperature", type=float, default=0.02, help="softmax temperature (default 0.02)")
    parser.add_argument("--backend", default="torch", help="retrieval backend: torch, faiss, faiss_ivfpq, ...")
    parser.add_argument("--memory-size", type=int, help="memory-bank rows (default: every example patch)")
    parser.add_argument("--augment-epochs", type=int, default=0, help="augmented passes over the examples")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid-rows", type=int, default=6, help="images in the overlay grid")


def segmenter_options(args: argparse.Namespace) -> dict[str, Any]:
    """from_examples keywords from the shared options."""
    if args.weights is not None and not args.weights.is_file():
        raise DataError(f"weights file {args.weights} does not exist")
    return {"weights": args.weights, "pretrained": not args.random_init,
            "backbone_kwargs": key_values(args.backbone_option), "features": args.features,
            "feature_options": key_values(args.feature_option) or None,
            "input_size": None if args.input_size is None else input_size(args.input_size),
            "k": args.k, "temperature": args.temperature, "backend": args.backend,
            "memory_size": args.memory_size, "augment_epochs": args.augment_epochs,
            "batch_size": args.batch_size, "device": args.device, "seed": args.seed}


def examples_label_space(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """num_classes / ignore_index / class_names from flags, else `<examples>/dataset.yaml` when present."""
    space: dict[str, Any] = {}
    if (folder / "dataset.yaml").is_file():
        info = read_folder_info(folder / "dataset.yaml")
        space = {"num_classes": info.num_classes, "ignore_index": info.ignore_index,
                 "class_names": list(info.class_names)}
    if args.num_classes is not None:
        space["num_classes"] = args.num_classes
    if args.ignore_index is not None:
        space["ignore_index"] = args.ignore_index
    if args.class_names is not None:
        space["class_names"] = [name.strip() for name in args.class_names.split(",")]
    return space


def build_segmenter(args: argparse.Namespace, examples: Path | None, memory: Path | None,
                    **overrides: Any) -> tuple[InContextSegmenter, list[Failure]]:
    """The segmenter of --examples (unreadable pairs skipped and returned) or of --memory."""
    options = {**segmenter_options(args), "backbone": args.backbone or "dinov2_vits14", **overrides}
    if memory is not None:
        segmenter = InContextSegmenter.from_memory(
            memory, backbone=args.backbone, weights=options["weights"], k=options["k"],
            temperature=options["temperature"], backend=options["backend"], device=options["device"],
            input_size=options["input_size"])
        return segmenter, []
    images, masks, failed = example_pairs(examples)
    log.info("%d example pairs in %s", len(images), examples)
    space = examples_label_space(examples, args)
    segmenter = InContextSegmenter.from_examples(images, masks, **space, **options)
    return segmenter, failed


def finish(summary: dict[str, Any], out: Path) -> None:
    """Write `<out>/summary.json`, print the metrics and where everything is."""
    from hummingbird_fungi.cli.main import print_metrics, write_results

    write_results(summary, out / "summary.json")
    if "metrics" in summary:
        print_metrics(summary["metrics"])
    failed = summary["segment"]["failed"] + summary.get("failed_examples", [])
    for failure in failed:
        print(f"skipped {failure['file']}: {failure['error']}")
    print(f"{summary['segment']['num_segmented']}/{summary['segment']['num_images']} images segmented -> "
          f"{out / 'masks'}, {out / 'overlays'}; grid {out / 'grid.png'}; summary {out / 'summary.json'}")


def run_segment(args: argparse.Namespace, examples: Path | None, memory: Path | None, images: Path,
                ground_truth: Path | None, out: Path, notes: Sequence[str] = (),
                **overrides: Any) -> tuple[dict[str, Any], InContextSegmenter]:
    """Build or load the segmenter, segment the image folder; the summary and the segmenter."""
    from hummingbird_fungi.eval.hbird import versions

    start = time.perf_counter()
    segmenter, failed_examples = build_segmenter(args, examples, memory, **overrides)
    if args.save_memory is not None:
        segmenter.save(args.save_memory)
    files, duplicates, ignored = list_images(images)
    result = segment_files(segmenter, files, out, masks_by_stem(ground_truth), args.batch_size, args.grid_rows)
    result["failed"] = duplicates + result["failed"]
    summary: dict[str, Any] = {
        "notes": list(notes), "examples": None if examples is None else str(examples),
        "memory": None if memory is None else str(memory), "images": str(images),
        "ground_truth": None if ground_truth is None else str(ground_truth),
        "segmenter": segmenter.describe(), "failed_examples": failed_examples, "ignored_files": ignored,
        "segment": result, "timings": {**segmenter.timings, "total_s": time.perf_counter() - start},
        "versions": versions(),
    }
    if "metrics" in result:
        summary["metrics"] = result.pop("metrics")
    return summary, segmenter


def cmd_segment(args: argparse.Namespace) -> None:
    """`hbfungi segment`."""
    if (args.examples is None) == (args.memory is None):
        raise ConfigError("pass exactly one of --examples DIR and --memory PATH")
    summary, _ = run_segment(args, args.examples, args.memory, args.images, args.ground_truth, args.out)
    finish(summary, args.out)


# --------------------------------------------------------------------------- demo


def demo_sources(args: argparse.Namespace) -> dict[str, Any]:
    """Flags, else HBFUNGI_* environment variables, for backbone, weights, examples and images."""
    env = os.environ.get
    sources = {"backbone": args.backbone or env("HBFUNGI_BACKBONE"),
               "weights": args.weights or (Path(env("HBFUNGI_WEIGHTS")) if env("HBFUNGI_WEIGHTS") else None),
               "examples": args.examples or (Path(env("HBFUNGI_EXAMPLES")) if env("HBFUNGI_EXAMPLES") else None),
               "images": args.images or (Path(env("HBFUNGI_IMAGES")) if env("HBFUNGI_IMAGES") else None)}
    if (sources["examples"] is None) != (sources["images"] is None):
        raise ConfigError("give both --examples and --images (or HBFUNGI_EXAMPLES and HBFUNGI_IMAGES), or neither")
    if sources["weights"] is not None and sources["backbone"] is None:
        raise ConfigError("--weights (HBFUNGI_WEIGHTS) needs --backbone NAME (HBFUNGI_BACKBONE), e.g. dinov2_vits14")
    return sources


def cmd_demo(args: argparse.Namespace) -> None:
    """`hbfungi demo`: the segment path on the embedded scenes with a random ViT, or on what is given."""
    from hummingbird_fungi.segment.demo_data import write_demo_data

    sources = demo_sources(args)
    out: Path = args.out
    notes, overrides = [], {}
    if sources["examples"] is None:
        dirs = write_demo_data(out / "data", seed=args.seed)
        examples, images, ground_truth = dirs["examples"], dirs["images"], dirs["ground_truth"]
        notes.append(f"DATA IS SYNTHETIC: procedurally generated street-like scenes (hummingbird_fungi.segment.demo_data, "
                     f"seed {args.seed}) under {out / 'data'}; not real photographs")
    else:
        examples, images, ground_truth = sources["examples"], sources["images"], args.ground_truth
        notes.append(f"data: examples {examples}, images {images}")
    args.weights = sources["weights"]
    if sources["backbone"] is None:
        args.backbone, args.random_init = DEMO_BACKBONE, True
        overrides.update(backbone_kwargs={**DEMO_BACKBONE_KWARGS, **key_values(args.backbone_option)},
                         long_side=DEMO_LONG_SIDE)
        notes.append(f"WEIGHTS ARE RANDOM: a randomly initialised {DEMO_BACKBONE} "
                     f"({DEMO_BACKBONE_KWARGS}), no pretrained weights; the masks show the pipeline at work, "
                     f"not what a trained ViT does (pass --backbone/--weights or HBFUNGI_BACKBONE/HBFUNGI_WEIGHTS)")
    else:
        args.backbone = sources["backbone"]
        described = args.weights if args.weights is not None else ("random init" if args.random_init
                                                                    else "pretrained hub weights")
        notes.append(f"backbone: {args.backbone} with {described}")
    for note in notes:
        log.warning("%s", note)
    summary, segmenter = run_segment(args, examples, None, images, ground_truth, out, notes=notes, **overrides)
    if "metrics" in summary:
        summary["memory_sweep"] = demo_sweep(args, examples, images, ground_truth, out, summary,
                                             {**overrides, "backbone": segmenter.backbone})
    finish(summary, out)
    for note in notes:
        print(note)


def demo_sweep(args: argparse.Namespace, examples: Path, images: Path, ground_truth: Path, out: Path,
               summary: dict[str, Any], overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """mIoU at 1/64, 1/16 and 1/4 of the full bank (plus the full one), plotted to mIoU_vs_memory.png."""
    full = summary["segmenter"]["memory_rows"]
    gts = masks_by_stem(ground_truth)
    files = [p for p in list_images(images)[0] if p.stem in gts]
    sizes = [full // 64, full // 16, full // 4]
    points = memory_sweep(lambda size: build_segmenter(args, examples, None, memory_size=size, **overrides)[0],
                          files, [gts[p.stem] for p in files], sizes, args.batch_size)
    points.append({"memory_size": None, "rows": full, "miou": summary["metrics"]["miou"]})
    plot_miou_vs_memory({summary["segmenter"]["features"]["kind"]: [(p["rows"], p["miou"]) for p in points]},
                        out / "miou_vs_memory.png")
    return points


def add_segment_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `segment` and `demo` to the hbfungi sub-commands."""
    seg = subparsers.add_parser("segment", help="segment a folder of images from a few annotated examples",
                                description="Segment every image of --images with a memory bank built from "
                                            "--examples (images/<stem>.*, masks/<stem>.png) or loaded from --memory.")
    seg.add_argument("--examples", type=Path, help="folder with images/<stem>.* and masks/<stem>.png")
    seg.add_argument("--memory", type=Path, help="a saved memory bank instead of --examples")
    seg.add_argument("--images", type=Path, required=True, help="folder of images to segment")
    seg.add_argument("--out", type=Path, required=True, help="output folder")
    seg.add_argument("--ground-truth", type=Path, help="folder of <stem>.png masks of --images: adds metrics")
    seg.add_argument("--save-memory", type=Path, help="also save the memory bank here (reuse with --memory)")
    seg.add_argument("--num-classes", type=int, help="classes (default: dataset.yaml, else largest id + 1)")
    seg.add_argument("--ignore-index", type=int, help="void id of the example masks (255 is void by default)")
    seg.add_argument("--class-names", help="comma-separated class names, id order")
    add_model_args(seg)
    seg.set_defaults(func=cmd_segment)

    demo = subparsers.add_parser("demo", help="segment the embedded synthetic scenes (or given folders)",
                                 description="Run `segment` on procedurally generated scenes with a randomly "
                                             "initialised ViT, or on --examples/--images with --backbone/--weights "
                                             "(also HBFUNGI_EXAMPLES, HBFUNGI_IMAGES, HBFUNGI_BACKBONE, "
                                             "HBFUNGI_WEIGHTS). Writes masks, overlays, plots and summary.json.")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default outputs/demo)")
    demo.add_argument("--examples", type=Path, help="folder with images/ and masks/ (default: synthetic)")
    demo.add_argument("--images", type=Path, help="folder of images to segment (default: synthetic)")
    demo.add_argument("--ground-truth", type=Path, help="masks of --images, for metrics")
    add_model_args(demo)
    demo.set_defaults(func=cmd_demo, num_classes=None, ignore_index=None, class_names=None, save_memory=None)

"""Folder runs: build a segmenter from an examples folder, segment a folder of images into masks,
overlays, a grid and a summary, and sweep the memory size. The `segment` and `demo` commands and
the tools call these.
"""

from __future__ import annotations

import glob
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from hummingbird_fungi.data.segmentation import IMAGE_EXTENSIONS, images_by_stem
from hummingbird_fungi.errors import DataError
from hummingbird_fungi.eval.metrics import pixel_accuracy
from hummingbird_fungi.segment.segmenter import InContextSegmenter
from hummingbird_fungi.data.transforms import read_image, read_mask
from hummingbird_fungi.fileio import make_dirs, save_image
from hummingbird_fungi.runtime import versions
from hummingbird_fungi.segment.visualize import (mask_image, overlay_grid, overlay_with_legend, plot_miou_vs_memory,
                                                 plot_per_class_iou)

log = logging.getLogger(__name__)

Failure = dict[str, str]


# --------------------------------------------------------------------------- folders


def candidate_files(source: str | Path) -> list[Path]:
    """The files a folder holds, one file, or the files a glob pattern matches, sorted; DataError if none."""
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if path.is_file():
        return [path]
    if glob.has_magic(str(source)):
        matches = sorted(Path(p) for p in glob.glob(str(source)) if Path(p).is_file())
        if matches:
            return matches
        raise DataError(f"no file matches the pattern {source}")
    raise DataError(f"{source} is neither a folder, nor a file, nor a glob pattern (e.g. 'photos/*.jpg')")


def list_images(source: str | Path) -> tuple[list[Path], list[Failure], list[str]]:
    """(image files sorted by name, duplicate-stem failures, names of non-image files) of a folder, a file
    or a glob pattern."""
    files, failed, ignored, stems = [], [], [], {}
    for path in candidate_files(source):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            ignored.append(path.name)
        elif path.stem in stems:
            failed.append({"file": str(path),
                           "error": f"same stem as {stems[path.stem]}; its mask would be overwritten"})
        else:
            stems[path.stem] = path.name
            files.append(path)
    if ignored:
        log.info("ignoring %d files without an image extension in %s: %s", len(ignored), source, ignored[:5])
    return files, failed, ignored


def masks_by_stem(folder: str | Path | None) -> dict[str, Path] | None:
    """stem -> <folder>/<stem>.png of a mask folder, .png in any case (None without a folder); DataError for two
    masks of one stem (`x.png` and `x.PNG`)."""
    if folder is None:
        return None
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"mask folder {folder} does not exist or is not a directory")
    return images_by_stem(folder, (".png",))


def example_dirs(folder: str | Path, split: str = "train") -> tuple[Path, Path]:
    """(image folder, mask folder) of an examples folder: `images/` + `masks/`, or the folder-dataset layout
    `images/<split>/` + `annotations/<split>/`."""
    folder = Path(folder)
    if (folder / "masks").is_dir():
        return folder / "images", folder / "masks"
    if (folder / "annotations" / split).is_dir():
        return folder / "images" / split, folder / "annotations" / split
    raise DataError(f"examples folder {folder} has neither masks/ (with images/) nor annotations/{split}/ "
                    f"(with images/{split}/)")


def example_pairs(folder: str | Path, split: str = "train") -> tuple[list[Path], list[Path], list[Failure]]:
    """Readable (image, mask) pairs of an examples folder (see `example_dirs`); failures named."""
    image_dir, mask_dir = example_dirs(folder, split)
    files, failed, _ = list_images(image_dir)
    masks = masks_by_stem(mask_dir)
    images, labels = [], []
    for path in files:
        mask = masks.get(path.stem)
        try:
            if mask is None:
                raise DataError(f"example {path} has no mask {mask_dir / (path.stem + '.png')}")
            read_image(path)
            read_mask(mask)
        except DataError as exc:
            log.warning("skipping example: %s", exc)
            failed.append({"file": str(path), "error": str(exc)})
            continue
        images.append(path)
        labels.append(mask)
    if not images:
        raise DataError(f"no readable example pairs in {image_dir} and {mask_dir}")
    return images, labels, failed


def write_mask(path: Path, mask: np.ndarray, colours: np.ndarray) -> None:
    """Palette PNG of class ids (ids unchanged, shown in `colours`; 16-bit grey beyond 256 classes), atomically."""
    save_image(path, mask_image(mask, colours))


# --------------------------------------------------------------------------- segmenting a folder


def read_ground_truth(gt_path: Path, size: tuple[int, int]) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """(the (h, w) ground truth of an image of `size`, or None with the problem recorded: unreadable, other size)."""
    try:
        gt = read_mask(gt_path)
    except DataError as exc:
        log.warning("no metrics for %s: %s", gt_path.stem, exc)
        return None, {"ground_truth_error": str(exc)}
    if gt.shape != size:
        problem = f"ground truth {gt_path} is {gt.shape[1]}x{gt.shape[0]}, the image {size[1]}x{size[0]}"
        log.warning("no metrics for %s: %s", gt_path.stem, problem)
        return None, {"ground_truth_error": problem}
    return torch.from_numpy(gt), {"ground_truth": str(gt_path)}


def segment_files(segmenter: InContextSegmenter, files: Sequence[Path], out: str | Path,
                  ground_truth: dict[str, Path] | None = None, batch_size: int = 4,
                  grid_rows: int = 6) -> dict[str, Any]:
    """Segment `files` into `<out>/masks/<stem>.png` and `<out>/overlays/<stem>.png`; draw the grid
    (`grid_rows` images spread evenly over the list) to `<out>/grid.png`.

    Unreadable images are logged and listed under `failed`; with ground truth (stem -> mask file)
    the result holds the metrics and `<out>/per_class_iou.png` is drawn.
    """
    out = Path(out)
    make_dirs(out / "masks", inside=out)
    make_dirs(out / "overlays", inside=out)
    total = segmenter.confusion_matrix() if ground_truth is not None else None
    unscored: Counter = Counter()
    records: list[dict[str, Any]] = []
    failed: list[Failure] = []
    rows: list[dict[str, Any]] = []
    shown = {files[i] for i in np.linspace(0, len(files) - 1, min(grid_rows, len(files))).round().astype(int)}
    start = time.perf_counter()
    with tqdm(total=len(files), desc="segment", unit="img") as progress:
        for first in range(0, len(files), batch_size):
            loaded, targets, scores = [], [], []
            for path in files[first:first + batch_size]:
                try:
                    image = read_image(path)
                except DataError as exc:
                    log.warning("skipping %s: %s", path.name, exc)
                    failed.append({"file": str(path), "error": str(exc)})
                    continue
                gt, score = None, {}
                if ground_truth is not None and path.stem in ground_truth:
                    gt, score = read_ground_truth(ground_truth[path.stem], (image.height, image.width))
                if gt is not None:
                    unscored += segmenter.unscored_ids(gt.numpy())
                loaded.append((path, image))
                targets.append(gt)
                scores.append(score)
            predictions = segmenter.predictions([image for _, image in loaded], targets) if loaded else []
            for (path, image), gt, record, prediction in zip(loaded, targets, scores, predictions):
                pred = segmenter.mask(prediction)
                write_mask(out / "masks" / f"{path.stem}.png", pred, segmenter.colours)
                save_image(out / "overlays" / f"{path.stem}.png", Image.fromarray(
                    overlay_with_legend(image, pred, segmenter.class_names, segmenter.colours)))
                record = {"file": str(path), "mask": f"masks/{path.stem}.png", "overlay": f"overlays/{path.stem}.png",
                          "size": list(pred.shape), **record}
                if prediction.confusions is not None:
                    matrix = prediction.confusions[segmenter.transfer.setting]
                    total.matrix += matrix
                    accuracy = pixel_accuracy(matrix)
                    record["pixel_accuracy"] = None if math.isnan(accuracy) else accuracy
                if path in shown:
                    accuracy = record.get("pixel_accuracy")
                    label = path.stem if accuracy is None else f"{path.stem}\npixel acc {100 * accuracy:.1f}%"
                    rows.append({"image": image, "pred": pred, "gt": None if gt is None else gt.numpy(),
                                 "name": label})
                records.append(record)
            progress.update(len(files[first:first + batch_size]))
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {"num_images": len(files), "num_segmented": len(records), "images": records,
                              "failed": failed, "seconds": seconds,
                              "images_per_s": len(records) / max(seconds, 1e-9)}
    if rows:
        overlay_grid(rows, out / "grid.png", class_names=segmenter.class_names, colours=segmenter.colours)
        result["grid"] = "grid.png"
    if total is not None and any("ground_truth" in record for record in records):
        segmenter.warn_unscored(unscored, f"the ground truth of {len(records)} images")
        result["unscored_ground_truth_pixels"] = {str(i): n for i, n in sorted(unscored.items())}
        result["metrics"] = segmenter.metrics(total)  # every metric None when all ground truth is void
        if result["metrics"]["miou"] is not None:
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


def sweep_and_plot(build: Callable[[int | None], InContextSegmenter], summary: dict[str, Any], images: Path,
                   ground_truth: Path, divisors: Sequence[int], path: Path, label: str, batch_size: int = 4,
                   title: str = "mIoU vs memory size") -> list[dict[str, Any]]:
    """mIoU at 1/d of a folder run's full bank for each divisor d, plus the full bank, plotted to `path`."""
    full = summary["segmenter"]["memory_rows"]
    gts = masks_by_stem(ground_truth) or {}
    files = [p for p in list_images(images)[0] if p.stem in gts]
    points = memory_sweep(build, files, [gts[p.stem] for p in files], [full // d for d in divisors], batch_size)
    points.append({"memory_size": None, "rows": full, "miou": summary["metrics"]["miou"]})
    plot_miou_vs_memory({label: [(p["rows"], p["miou"]) for p in points]}, path, title=title)
    return points


# --------------------------------------------------------------------------- examples and whole runs


def segmenter_from_folder(examples: Path, split: str = "train",
                          **options: Any) -> tuple[InContextSegmenter, list[Failure]]:
    """The segmenter of an examples folder (see `example_dirs`; optional dataset.yaml) and the skipped pairs.

    `options` go to `InContextSegmenter.from_examples` and win over dataset.yaml's label space.
    """
    images, masks, failed = example_pairs(examples, split)
    log.info("%d example pairs in %s", len(images), examples)
    described = Path(examples) / "dataset.yaml"
    segmenter = InContextSegmenter.from_examples(images, masks, dataset_yaml=described if described.is_file() else None,
                                                 **options)
    return segmenter, failed


def segment_folder(segmenter: InContextSegmenter, images: str | Path, out: Path, ground_truth: Path | None = None,
                   batch_size: int = 4, grid_rows: int = 6, record: dict[str, Any] | None = None,
                   listing: tuple[list[Path], list[Failure], list[str]] | None = None) -> dict[str, Any]:
    """Segment every image of a folder, file or glob into `out`; the run's summary (what, how, metrics, timings).

    `listing` is `list_images(images)` when the caller already made it (to check the input first).
    """
    start = time.perf_counter()
    files, duplicates, ignored = listing or list_images(images)
    result = segment_files(segmenter, files, out, masks_by_stem(ground_truth), batch_size, grid_rows)
    result["failed"] = duplicates + result["failed"]
    summary: dict[str, Any] = {
        **(record or {}), "images": str(images), "ground_truth": None if ground_truth is None else str(ground_truth),
        "segmenter": segmenter.describe(), "ignored_files": ignored, "segment": result,
        "timings": {**segmenter.timings, "segment_s": time.perf_counter() - start}, "versions": versions(),
    }
    if "metrics" in result:
        summary["metrics"] = result.pop("metrics")
    return summary

"""Folder runs: build a segmenter from an examples folder, segment a folder of images into masks,
overlays, a grid and a summary, and sweep the memory size. The `segment` and `demo` commands and
the tools call these.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from hummingbird_fungi.data.segmentation import IMAGE_EXTENSIONS, read_folder_info
from hummingbird_fungi.errors import DataError
from hummingbird_fungi.eval.metrics import ConfusionMatrix, pixel_accuracy
from hummingbird_fungi.segment.segmenter import InContextSegmenter
from hummingbird_fungi.data.transforms import read_image, read_mask
from hummingbird_fungi.segment.visualize import overlay, overlay_grid, plot_miou_vs_memory, plot_per_class_iou

log = logging.getLogger(__name__)

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


def folder_label_space(folder: Path) -> dict[str, Any]:
    """num_classes / ignore_index / class_names from `<folder>/dataset.yaml` (empty when there is none)."""
    if not (folder / "dataset.yaml").is_file():
        return {}
    info = read_folder_info(folder / "dataset.yaml")
    return {"num_classes": info.num_classes, "ignore_index": info.ignore_index, "class_names": list(info.class_names)}


def segmenter_from_folder(examples: Path, **options: Any) -> tuple[InContextSegmenter, list[Failure]]:
    """The segmenter of an examples folder (images/, masks/, optional dataset.yaml) and the skipped pairs.

    `options` go to `InContextSegmenter.from_examples` and win over dataset.yaml's label space.
    """
    images, masks, failed = example_pairs(examples)
    log.info("%d example pairs in %s", len(images), examples)
    segmenter = InContextSegmenter.from_examples(images, masks, **{**folder_label_space(examples), **options})
    return segmenter, failed


def segment_folder(segmenter: InContextSegmenter, images: Path, out: Path, ground_truth: Path | None = None,
                   batch_size: int = 4, grid_rows: int = 6, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Segment every image of a folder into `out` and return the run's summary (what, how, metrics, timings)."""
    from hummingbird_fungi.eval.hbird import versions

    start = time.perf_counter()
    files, duplicates, ignored = list_images(images)
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

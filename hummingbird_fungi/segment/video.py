"""Video in-context segmentation: annotate a frame or a few, segment the whole clip (`hbfungi video`).

Choices, in order of the pipeline:

* Frames are the images of a folder sorted by name; the masks folder holds `<stem>.png` class-id masks of
  frames with the same stems. The first frame must have one. `annotate="all"` puts every given mask in the
  memory; `annotate="first"` only the first frame's, and the other masks are ground truth to score against
  (DAVIS's first-frame protocol with the benchmark's own annotation folder).
* Before the model loads every frame and mask header is read (`check_clip`): an unreadable file, frames of
  different sizes or a mask of another size than its frame are refused. A frame that still fails while the
  clip is segmented (e.g. truncated pixel data) is listed under `failed` and the clip goes on.
* The memory bank is built by `InContextSegmenter.from_examples` from the annotated frames (same label
  space rules, features, input size and retrieval options as `hbfungi segment`). All frames must share
  one size.
* Annotated frames are not predicted: their output mask is the annotation itself.
* Propagation (`propagate=N`): the patch features of the last N predicted frames, with their predicted
  soft patch labels, join the memory. Each query patch takes the k nearest neighbours (cosine) among the
  bank's rows and those frames' patches together, weighted by softmax(cosine / temperature) as in label
  transfer. With `radius=R` a query patch only sees patches of the propagated frames within R patches of
  its own grid position (Chebyshev distance: a (2R+1)^2 window), the label-propagation evaluation of
  DINO-style papers; the annotated frames stay in the bank without a spatial limit. Frames are therefore
  segmented one at a time, in order.
* `strip.png` shows STRIP_FRAMES evenly spaced frames (first and last included) as overlays side by side,
  each at most STRIP_SIDE pixels on its long side: the clip at a glance.
* J of a frame is the foreground IoU of DAVIS: foreground = any class id other than 0 (void pixels of the
  ground truth ignored), J = 1 when both ground truth and prediction are empty. Frames with a mask that is
  not in the memory are scored; the summary holds each J, its 2x2 confusion matrix (rows ground truth
  background/foreground, for bootstrap intervals over frames) and the mean J over scored frames.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hummingbird_fungi.data.transforms import read_image, read_mask
from hummingbird_fungi.errors import ConfigError, DataError
from hummingbird_fungi.eval.metrics import foreground_confusion, jaccard
from hummingbird_fungi.fileio import make_dirs, save_image, write_json
from hummingbird_fungi.runtime import versions
from hummingbird_fungi.segment.folders import Failure, list_images, masks_by_stem, read_ground_truth, write_mask
from hummingbird_fungi.segment.segmenter import InContextSegmenter
from hummingbird_fungi.segment.visualize import overlay, overlay_with_legend, thumbnail

log = logging.getLogger(__name__)

ANNOTATE_CHOICES = ("all", "first")
STRIP_FRAMES, STRIP_SIDE = 6, 320
ORIENTATION = 0x0112  # the EXIF orientation tag; 5-8 turn the image by 90 degrees


def strip_indices(total: int, count: int = STRIP_FRAMES) -> list[int]:
    """`count` evenly spaced frame indices of a clip of `total` frames, first and last included."""
    return sorted({int(i) for i in np.linspace(0, total - 1, min(count, total)).round()})


def video_strip(thumbnails: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """(h, w, 3) thumbnails of equal height side by side with white gaps -> (h, W, 3) uint8."""
    spacer = np.full((thumbnails[0].shape[0], gap, 3), 255, dtype=np.uint8)
    parts = [part for thumb in thumbnails for part in (spacer, thumb)][1:]
    return np.concatenate(parts, axis=1)


# --------------------------------------------------------------------------- inputs


def header_size(path: Path, what: str, orient: bool = False) -> tuple[int, int]:
    """(h, w) of an image file from its header, pixels not decoded (`orient`: as displayed, after its EXIF
    orientation); DataError naming an unreadable file."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            # a PNG's EXIF is only read without decoding when it precedes the pixels
            exif = image.getexif() if orient and (image.format != "PNG" or "exif" in image.info) else {}
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read {what} {path}: {err}") from err
    return (width, height) if exif.get(ORIENTATION, 1) in (5, 6, 7, 8) else (height, width)


def check_clip(files: Sequence[Path], masks: dict[str, Path]) -> None:
    """Refuse a clip (frames `files`, stem -> mask) with an unreadable frame or mask, frames of different sizes
    or a mask of another size than its frame; only headers are read."""
    first_size = None
    for path in files:
        height, width = size = header_size(path, "frame", orient=True)
        first_size = first_size or size
        if size != first_size:
            raise DataError(f"frame {path} is {width}x{height} but {files[0]} is {first_size[1]}x{first_size[0]} "
                            f"(width x height): the frames of a clip must share one size")
        mask = masks.get(path.stem)
        mask_size = None if mask is None else header_size(mask, "mask")
        if mask_size not in (None, size):
            raise DataError(f"mask {mask} is {mask_size[1]}x{mask_size[0]} but its frame {path} is {width}x{height} "
                            f"(width x height)")


def video_inputs(frames: str | Path, masks: str | Path,
                 annotate: str = "all") -> tuple[list[Path], dict[str, Path], dict[str, Path]]:
    """(frames sorted by name, stem -> mask of annotated frames, stem -> mask to score); DataError when the
    first frame has no mask, stems repeat, there are no frames, or `check_clip` refuses a frame or mask."""
    if annotate not in ANNOTATE_CHOICES:
        raise ConfigError(f"annotate must be one of {ANNOTATE_CHOICES}, got {annotate!r}")
    files, duplicates, _ = list_images(frames)
    if duplicates:
        raise DataError(f"frames with the same stem in {frames}: {duplicates[0]['file']} ({duplicates[0]['error']})")
    if not files:
        raise DataError(f"no frames in {frames}")
    given = masks_by_stem(masks) or {}
    first = files[0].stem
    if first not in given:
        raise DataError(f"no mask for the first frame {files[0].name}: expected {Path(masks) / (first + '.png')}")
    stems = {path.stem for path in files}
    unused = sorted(set(given) - stems)
    if unused:
        log.warning("%d masks in %s match no frame and are ignored: %s", len(unused), masks, unused[:5])
    given = {stem: path for stem, path in given.items() if stem in stems}
    check_clip(files, given)
    annotated = {first: given[first]} if annotate == "first" else given
    truth = {stem: path for stem, path in given.items() if stem not in annotated}
    return files, annotated, truth


# --------------------------------------------------------------------------- propagation


class PropagatedFrames:
    """The last `size` predicted frames: L2-normalised patch features (N, D) and soft labels (N, C) on a grid."""

    def __init__(self, size: int, radius: int | None = None) -> None:
        if size < 0 or (radius is not None and radius < 0):
            raise ConfigError(f"propagate and radius must be >= 0, got {size} and {radius}")
        self.frames: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=size)
        self.radius, self.grid = radius, None
        self._allowed: torch.Tensor | None = None

    def add(self, features: torch.Tensor, probs: torch.Tensor, grid: tuple[int, int]) -> None:
        """Remember a predicted frame (dropped at once when propagation is off)."""
        if self.frames.maxlen:
            self.check_grid(grid)
            self.frames.append((F.normalize(features.float(), dim=-1), probs.float()))

    def check_grid(self, grid: tuple[int, int]) -> None:
        """Fix the patch grid at the first frame; frames of another grid are refused."""
        if self.grid is None:
            self.grid = grid
            rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
            rows, cols = rows.reshape(-1), cols.reshape(-1)  # (N,) grid position of each patch
            distance = torch.maximum((rows[:, None] - rows[None]).abs(), (cols[:, None] - cols[None]).abs())
            self._allowed = None if self.radius is None else distance <= self.radius  # (N, N)
        elif grid != self.grid:
            raise DataError(f"frames must share one size: patch grid {grid} after {self.grid}")

    def candidates(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The k best (cosine (N, k), soft label (N, k, C)) among the remembered patches within the radius."""
        if not self.frames:
            return None
        query = F.normalize(query.float(), dim=-1)
        sims = torch.cat([query @ features.T if self._allowed is None
                          else (query @ features.T).masked_fill(~self._allowed, float("-inf"))
                          for features, _ in self.frames], dim=1)  # (N, M * N)
        labels = torch.cat([probs for _, probs in self.frames])  # (M * N, C)
        best, ids = sims.topk(min(k, sims.shape[1]), dim=1)
        return best, labels[ids]


# --------------------------------------------------------------------------- a clip


def segment_frame(segmenter: InContextSegmenter, image: Image.Image,
                  memory: PropagatedFrames) -> np.ndarray:
    """Class-id mask (h, w) of one RGB frame, the propagated frames of `memory` among its candidates; the frame
    then joins `memory` with its predicted patch labels."""
    grid = segmenter.backbone.grid_size(*segmenter.network_size(image.height, image.width))
    memory.check_grid(grid)
    prediction = segmenter.predictions([image], extra=memory)[0]
    memory.add(prediction.features.cpu(), prediction.probs, grid)
    return segmenter.mask(prediction)


def segment_clip(segmenter: InContextSegmenter, files: Sequence[Path], annotated: dict[str, Path],
                 truth: dict[str, Path], out: Path, propagate: int = 0, radius: int | None = None) -> dict[str, Any]:
    """Write `<out>/masks/<stem>.png` and `<out>/overlays/<stem>.png` for every frame and `<out>/strip.png`;
    per-frame records and J. A frame that cannot be read or segmented is logged, listed under `failed` and
    skipped; a ground-truth mask that cannot be scored is recorded in its frame's `ground_truth_error`."""
    make_dirs(out / "masks", inside=out)
    make_dirs(out / "overlays", inside=out)
    memory = PropagatedFrames(propagate, radius)
    records: list[dict[str, Any]] = []
    failed: list[Failure] = []
    start = time.perf_counter()
    predicted = 0
    shown, thumbnails, strip_frames = strip_indices(len(files)), [], []
    for number, path in enumerate(files):
        try:
            image = read_image(path)
            if path.stem in annotated:
                pred = read_mask(annotated[path.stem]).astype(segmenter.mask_dtype)  # size checked by from_examples
            else:
                pred = segment_frame(segmenter, image, memory)
                predicted += 1
        except DataError as exc:
            log.warning("skipping frame %s: %s", path.name, exc)
            failed.append({"file": str(path), "error": str(exc)})
            continue
        write_mask(out / "masks" / f"{path.stem}.png", pred, segmenter.colours)
        save_image(out / "overlays" / f"{path.stem}.png", Image.fromarray(
            overlay_with_legend(image, pred, segmenter.class_names, segmenter.colours)))
        if number in shown:
            thumbnails.append(thumbnail(overlay(image, pred, len(segmenter.class_names), colours=segmenter.colours),
                                        STRIP_SIDE))
            strip_frames.append(path.stem)
        record: dict[str, Any] = {"frame": str(path), "mask": f"masks/{path.stem}.png",
                                  "overlay": f"overlays/{path.stem}.png", "annotated": path.stem in annotated}
        if path.stem in truth:
            gt, score = read_ground_truth(truth[path.stem], pred.shape)
            record.update(score)
            if gt is not None:
                confusion = foreground_confusion(pred, gt.numpy(), segmenter.ignore_index)
                record.update(j=jaccard(confusion), confusion=confusion.tolist())
        records.append(record)
    seconds = time.perf_counter() - start
    if thumbnails:
        save_image(out / "strip.png", Image.fromarray(video_strip(thumbnails)))
    scores = [record["j"] for record in records if "j" in record]
    if failed:
        log.warning("%d of %d frames could not be segmented: %s", len(failed), len(files),
                    ", ".join(Path(f["file"]).name for f in failed))
    return {"num_frames": len(files), "num_segmented": len(records),
            "num_annotated": sum(record["annotated"] for record in records), "num_scored": len(scores),
            "j_mean": float(np.mean(scores)) if scores else None, "frames": records, "failed": failed,
            "seconds": seconds, "seconds_per_predicted_frame": seconds / predicted if predicted else None,
            "strip": "strip.png" if thumbnails else None, "strip_frames": strip_frames}


def run_video(frames: str | Path, masks: str | Path, out: str | Path, annotate: str = "all", propagate: int = 0,
              radius: int | None = None, **options: Any) -> dict[str, Any]:
    """Build the memory from the annotated frames, segment the clip into `out`, write `<out>/summary.json`.

    `options` go to `InContextSegmenter.from_examples`; returns the summary.
    """
    start = time.perf_counter()
    out = Path(out)
    files, annotated, truth = video_inputs(frames, masks, annotate)
    PropagatedFrames(propagate, radius)  # bad settings refused before the model loads
    log.info("%d frames, %d annotated, %d to score; propagation over %d frames, radius %s", len(files),
             len(annotated), len(truth), propagate, radius)
    examples = [path for path in files if path.stem in annotated]
    segmenter = InContextSegmenter.from_examples(examples, [annotated[p.stem] for p in examples], **options)
    clip = segment_clip(segmenter, files, annotated, truth, out, propagate, radius)
    summary = {"frames": str(frames), "masks": str(masks), "annotate": annotate, "propagate": propagate,
               "radius": radius, "annotated": sorted(annotated), "segmenter": segmenter.describe(), "video": clip,
               "j_mean": clip["j_mean"],
               "timings": {**segmenter.timings, "total_s": time.perf_counter() - start}, "versions": versions()}
    write_json(out / "summary.json", summary)
    return summary

"""Video in-context segmentation: annotate a frame or a few, segment the whole clip (`hbfungi video`).

Choices, in order of the pipeline (docs/protocol.md#video-segmentation):

* Frames are the images of a folder sorted by name; the masks folder holds `<stem>.png` id masks of frames with
  the same stems. The first frame must have one. `annotate="all"` puts every given mask in the memory;
  `annotate="first"` only the first frame's, and the other masks are ground truth to score against.
* Before the model loads every frame and mask header is read (`check_clip`): an unreadable file, frames of
  different sizes or a mask of another size than its frame are refused. A frame that still fails while the
  clip is segmented (e.g. truncated pixel data) is listed under `failed` and the clip goes on.
* A protocol (`VideoProtocol`, presets in VIDEO_PROTOCOLS: `first`, `propagate`, `dino`) says how a frame is
  segmented: its network input (`resolution`), the context (the annotated frames, searched in the memory bank
  without a spatial limit or, with `first_radius`, only within a neighbourhood; the last `propagate` predicted
  frames with their soft patch labels, within `radius`), and the vote (k nearest context patches by cosine,
  weights softmax(cosine / temperature)).
* The memory bank is built by `InContextSegmenter.from_examples` from the annotated frames (same label space
  rules, features and retrieval as `hbfungi segment`) at the protocol's input size. The features of every frame
  are extracted ahead, in batches; then frames are segmented one at a time, in order, from those features,
  through the one predict loop (`retrieval.predict.predict`) with the context as its extra candidates.
  Protocols of one input size share one extraction.
* Annotated frames are not predicted: their output mask is the annotation itself.
* `strip.png` shows STRIP_FRAMES evenly spaced frames (first and last included) as overlays side by side,
  each at most STRIP_SIDE pixels on its long side: the clip at a glance.
* Scores are DAVIS's, per object (each id but 0 of the label space): J (IoU) and F (boundary F-measure), void
  ground-truth pixels left out (`eval.metrics.davis_frame`); per frame, and per object their mean and recall.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from hummingbird_fungi.config.schema import TransformOptions
from hummingbird_fungi.config.typed import Section, at_least, option, positive, with_overrides
from hummingbird_fungi.data.transforms import read_image, read_mask, resize_mask
from hummingbird_fungi.errors import ConfigError, DataError
from hummingbird_fungi.eval.metrics import davis_frame, davis_statistics
from hummingbird_fungi.features.transform import FeatureTransform
from hummingbird_fungi.fileio import make_dirs, save_image, write_json
from hummingbird_fungi.memory.build import too_few_rows, transformed
from hummingbird_fungi.memory.labels import patchify_labels, soft_labels
from hummingbird_fungi.models.encoders import Encoder
from hummingbird_fungi.models.factory import create_encoder
from hummingbird_fungi.registry import Registry
from hummingbird_fungi.retrieval.indexes import merge_topk
from hummingbird_fungi.retrieval.predict import QueryBatch, predict
from hummingbird_fungi.runtime import resolve_device, versions
from hummingbird_fungi.segment.defaults import VIDEO_FEATURES
from hummingbird_fungi.segment.folders import Failure, list_images, masks_by_stem, read_ground_truth, write_mask
from hummingbird_fungi.segment.segmenter import InContextSegmenter
from hummingbird_fungi.segment.visualize import overlay, overlay_with_legend, thumbnail

log = logging.getLogger(__name__)

ANNOTATE_CHOICES = ("all", "first")
STRIP_FRAMES, STRIP_SIDE = 6, 320
WhitenOn = Literal["examples", "clip"]  # the patches a feature transform is fitted on
ORIENTATION = 0x0112  # the EXIF orientation tag; 5-8 turn the image by 90 degrees


# --------------------------------------------------------------------------- protocols


@dataclass
class VideoProtocol(Section):
    """How the frames of a clip are segmented: network input, context and vote."""

    key: ClassVar[str] = "protocol"
    k: int = option(30, check=at_least(1), doc="context patches voting for each query patch")
    temperature: float = option(0.02, check=positive, doc="vote weights softmax(cosine / temperature)")
    propagate: int = option(0, check=at_least(0), doc="last N predicted frames in the context, with soft labels")
    radius: int | None = option(None, check=at_least(0),
                                doc="predicted frames: only patches within R patches of the query's grid position "
                                    "(a (2R+1)^2 window); null: no limit")
    first_radius: int | None = option(None, check=at_least(0),
                                      doc="annotated frames: null searches them in the memory bank without a limit; "
                                          "R puts them in the context within R patches and the bank is not searched")
    first_labels: Literal["nearest", "area"] = option(
        "area", doc="with first_radius, annotated frames' patch labels: the mask's pixel at each patch centre, "
                    "one-hot (DINO), or the class fractions of the patch's pixels (the bank's soft labels)")
    resolution: int | None = option(None, check=at_least(1),
                                    doc="short side of the network input in pixels (both sides rounded down to the "
                                        "patch); null: the segmenter's input size (long side 448)")


VIDEO_PROTOCOLS: Registry[Callable[[], VideoProtocol]] = Registry("video protocol")


@VIDEO_PROTOCOLS.register("first")
def first_frame_protocol() -> VideoProtocol:
    """Annotated frames only: the memory bank, k=30, T=0.02, input long side 448 (the default)."""
    return VideoProtocol()


@VIDEO_PROTOCOLS.register("propagate")
def propagate_protocol() -> VideoProtocol:
    """The memory bank plus the last 7 predicted frames within 4 patches, k=30, T=0.02, input long side 448."""
    return VideoProtocol(propagate=7, radius=4)


@VIDEO_PROTOCOLS.register("dino")
def dino_protocol() -> VideoProtocol:
    """DINO's label propagation: first frame (one-hot) and last 7 predicted frames, all within 12 patches, k=5,
    T=0.1, short side 480."""
    return VideoProtocol(k=5, temperature=0.1, propagate=7, radius=12, first_radius=12, first_labels="nearest",
                         resolution=480)


def video_protocol(protocol: str | VideoProtocol = "first", **overrides: Any) -> VideoProtocol:
    """A registered protocol by name (or a given one) with `overrides` (VideoProtocol fields) applied, checked."""
    base = VIDEO_PROTOCOLS.get(protocol)() if isinstance(protocol, str) else protocol
    return with_overrides(VideoProtocol, base, overrides)


def network_size(frame: tuple[int, int], patch: int, resolution: int) -> tuple[int, int]:
    """(H, W) network input of an (h, w) frame: short side `resolution`, the long side scaled alike, each rounded
    down to a multiple of `patch` (at least one patch)."""
    scale = resolution / min(frame)
    return tuple(max(patch, int(side * scale) // patch * patch) for side in frame)  # type: ignore[return-value]


# --------------------------------------------------------------------------- inputs


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


# --------------------------------------------------------------------------- context


def window(grid: tuple[int, int], radius: int | None) -> torch.Tensor | None:
    """(N, N) bool: patch j lies within `radius` patches (Chebyshev) of patch i on a row-major grid; None: no limit."""
    if radius is None:
        return None
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)  # (N,) grid position of each patch
    return torch.maximum((rows[:, None] - rows[None]).abs(), (cols[:, None] - cols[None]).abs()) <= radius


class VideoContext:
    """The context of the next frame: annotated frames (`anchor`, exclusive mode only) and the last `size` predicted
    frames, as L2-normalised patch features (N, D) with soft labels (N, C) on one grid; the extra candidates of
    label transfer (exclusive when `first_radius` is set: the memory bank is then not searched)."""

    def __init__(self, size: int, grid: tuple[int, int], radius: int | None = None,
                 first_radius: int | None = None) -> None:
        if size < 0 or any(r is not None and r < 0 for r in (radius, first_radius)):
            raise ConfigError(f"propagate and radii must be >= 0, got {size}, {radius} and {first_radius}")
        self.grid, self.exclusive = grid, first_radius is not None
        self.anchors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.frames: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=size)
        self._windows = {"anchor": window(grid, first_radius), "frame": window(grid, radius)}

    def anchor(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add an annotated frame: features (N, D) and labels (N, C)."""
        self.anchors.append((F.normalize(features.float(), dim=-1), labels.float()))

    def add(self, features: torch.Tensor, probs: torch.Tensor) -> None:
        """Remember a predicted frame: features (N, D) and soft labels (N, C) (dropped when `size` is 0)."""
        if self.frames.maxlen:
            self.frames.append((F.normalize(features.float(), dim=-1), probs.float()))

    def candidates(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The k best (cosine (N, k), soft label (N, k, C)) among the context patches each query (N, D) may see."""
        parts = [(features, labels, self._windows[kind]) for kind, frames in
                 (("anchor", self.anchors), ("frame", self.frames)) for features, labels in frames]
        if not parts:
            return None
        query = F.normalize(query.float(), dim=-1)
        best, offset = None, 0
        for features, _, allowed in parts:  # the k best of each frame, merged into a running top-k
            cosine = query @ features.T  # (N, N)
            if allowed is not None:
                cosine = cosine.masked_fill(~allowed, float("-inf"))
            top, ids = cosine.topk(min(k, cosine.shape[1]), dim=1)
            best = merge_topk(best, (top, ids + offset), k)
            offset += len(features)
        scores, ids = best
        return scores, torch.cat([labels for _, labels, _ in parts])[ids]  # (N, k), (N, k, C)


def anchor_labels(mask: np.ndarray, grid: tuple[int, int], input_size: tuple[int, int], num_classes: int,
                  mode: str) -> torch.Tensor:
    """(N, C) patch labels of an (h, w) id mask on a grid: `nearest`, the one-hot id at each patch centre of the
    mask resized to the grid (DINO); `area`, class fractions of the patch's pixels at the network input
    `input_size` (the memory bank's soft labels). Void and out-of-range ids count for no class."""
    if mode == "nearest":
        small = Image.fromarray(mask.astype(np.int32)).resize(grid[::-1], Image.Resampling.NEAREST)
        ids, patch = torch.from_numpy(np.asarray(small, dtype=np.int64)), 1
    else:
        ids, patch = resize_mask(torch.from_numpy(mask.astype(np.int64)), input_size), input_size[0] // grid[0]
    return soft_labels(patchify_labels(ids[None], patch, num_classes, void_to_background=False))[0]


# --------------------------------------------------------------------------- a clip


@dataclass
class ClipFeatures:
    """Patch features of every readable frame of a clip, extracted ahead of propagation."""

    features: dict[int, torch.Tensor]  # frame index -> (N, D) float16
    grid: tuple[int, int]  # (h, w) patch grid
    frame_size: tuple[int, int]  # (H, W) of the frames
    seconds: float  # reading and extraction


def extract_clip(segmenter: InContextSegmenter, files: Sequence[Path], batch_size: int = 8,
                 failed: list[Failure] | None = None) -> ClipFeatures:
    """Read the frames and extract their features `batch_size` at a time; unreadable frames are logged and added
    to `failed`."""
    start, features = time.perf_counter(), {}
    grid = frame_size = None
    for first in tqdm(range(0, len(files), batch_size), desc="frame features", unit="batch", leave=False):
        images, ids = [], []
        for index in range(first, min(first + batch_size, len(files))):
            try:
                images.append(read_image(files[index]))
                ids.append(index)
            except DataError as exc:
                log.warning("skipping frame %s: %s", files[index].name, exc)
                if failed is not None:
                    failed.append({"file": str(files[index]), "error": str(exc)})
        for batch in segmenter.query_batches(images):
            out = segmenter.extractor(batch.images.to(segmenter.device)).detach()  # (B, N, D)
            for key, row in zip(batch.keys, out):
                features[ids[key]] = row.to("cpu", torch.float16)
            grid, frame_size = batch.grid, tuple(batch.sizes[0])
    return ClipFeatures(features, grid, frame_size, time.perf_counter() - start)


def propagate(segmenter: InContextSegmenter, clip: ClipFeatures, protocol: VideoProtocol,
              annotated: dict[int, np.ndarray]) -> Any:
    """Yield (frame index, (h, w) id mask or the DataError that stopped it) for every frame of `clip` in order:
    annotated frames (index -> mask) give their mask, the others are predicted from their context."""
    context = VideoContext(protocol.propagate, clip.grid, protocol.radius, protocol.first_radius)
    if context.exclusive:
        for index, mask in annotated.items():
            context.anchor(clip.features[index], anchor_labels(mask, clip.grid, segmenter.input_size,
                                                               segmenter.num_classes, protocol.first_labels))
    setting = (protocol.k, protocol.temperature)
    for index in sorted(clip.features):
        if index in annotated:
            yield index, annotated[index].astype(segmenter.mask_dtype)
            continue
        batch = QueryBatch(clip.grid, [clip.frame_size], features=clip.features[index][None].float(), keys=[index])
        try:
            prediction = next(predict([batch], segmenter.transfer, settings=[setting],
                                      ignore_index=segmenter.ignore_index,
                                      class_chunk=segmenter.transfer_options.class_chunk, device=segmenter.device,
                                      extra=context, non_finite=segmenter.non_finite))
        except DataError as exc:
            yield index, exc
            continue
        context.add(prediction.features, prediction.probs)
        yield index, prediction.masks[setting].numpy().astype(segmenter.mask_dtype)


def score_objects(frames: Sequence[dict[str, Any]], objects: Sequence[int]) -> dict[str, Any]:
    """DAVIS statistics of scored frame records: per object J and F mean and recall, their means over objects,
    and J&F-mean = (J-mean + F-mean) / 2 (None when nothing was scored)."""
    per_object = {}
    for obj in objects:
        j = davis_statistics([frame["j"][str(obj)] for frame in frames if "j" in frame])
        f = davis_statistics([frame["f"][str(obj)] for frame in frames if "f" in frame])
        per_object[str(obj)] = {"j_mean": j["mean"], "j_recall": j["recall"], "f_mean": f["mean"],
                                "f_recall": f["recall"]}
    scores: dict[str, Any] = {}
    for key in ("j_mean", "j_recall", "f_mean", "f_recall"):
        values = [row[key] for row in per_object.values() if row[key] is not None]
        scores[key] = float(np.mean(values)) if values else None
    both = scores["j_mean"] is not None and scores["f_mean"] is not None
    return {"jf_mean": (scores["j_mean"] + scores["f_mean"]) / 2 if both else None, **scores, "objects": per_object}


def segment_clip(segmenter: InContextSegmenter, files: Sequence[Path], annotated: dict[str, Path],
                 truth: dict[str, Path], out: Path, protocol: VideoProtocol, clip: ClipFeatures,
                 failed: Sequence[Failure] = (), overlays: bool = True) -> dict[str, Any]:
    """Segment a clip with `protocol` from its features (`extract_clip`; the frames that failed there in `failed`);
    write `<out>/masks/<stem>.png`, `<out>/overlays/<stem>.png` (with `overlays`) and `<out>/strip.png`; per-frame
    records, DAVIS scores of the frames in `truth` and frames per second. A frame that cannot be read or segmented
    is logged, listed under `failed` and skipped; a ground-truth mask that cannot be scored is recorded in its
    frame's `ground_truth_error`."""
    failed = list(failed)
    make_dirs(out / "masks", inside=out)
    if overlays:
        make_dirs(out / "overlays", inside=out)
    masks = {i: read_mask(annotated[path.stem]) for i, path in enumerate(files)
             if path.stem in annotated and i in clip.features}
    if 0 not in masks:
        raise DataError(f"the first frame {files[0]} could not be read: nothing to propagate from")
    objects = range(1, segmenter.num_classes)
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    shown, thumbnails, strip_frames = strip_indices(len(files)), [], []
    for index, pred in tqdm(propagate(segmenter, clip, protocol, masks), total=len(clip.features),
                            desc="propagate", unit="frame", leave=False):
        path = files[index]
        if isinstance(pred, DataError):
            log.warning("skipping frame %s: %s", path.name, pred)
            failed.append({"file": str(path), "error": str(pred)})
            continue
        write_mask(out / "masks" / f"{path.stem}.png", pred, segmenter.colours)
        record: dict[str, Any] = {"frame": str(path), "mask": f"masks/{path.stem}.png",
                                  "annotated": path.stem in annotated}
        if overlays or index in shown:
            image = read_image(path)
        if overlays:
            save_image(out / "overlays" / f"{path.stem}.png", Image.fromarray(
                overlay_with_legend(image, pred, segmenter.class_names, segmenter.colours)))
            record["overlay"] = f"overlays/{path.stem}.png"
        if index in shown:
            thumbnails.append(thumbnail(overlay(image, pred, len(segmenter.class_names), colours=segmenter.colours),
                                        STRIP_SIDE))
            strip_frames.append(path.stem)
        if path.stem in truth:
            gt, problem = read_ground_truth(truth[path.stem], pred.shape)
            record.update(problem)
            if gt is not None:
                j, f = davis_frame(pred, gt.numpy(), objects, segmenter.ignore_index)
                record.update(j=dict(zip(map(str, objects), j)), f=dict(zip(map(str, objects), f)))
        records.append(record)
    seconds = time.perf_counter() - start
    if thumbnails:
        save_image(out / "strip.png", Image.fromarray(video_strip(thumbnails)))
    if failed:
        log.warning("%d of %d frames could not be segmented: %s", len(failed), len(files),
                    ", ".join(Path(f["file"]).name for f in failed))
    predicted = sum(not record["annotated"] for record in records)
    scored = [record for record in records if "j" in record]
    return {"num_frames": len(files), "num_segmented": len(records),
            "num_annotated": len(records) - predicted, "num_scored": len(scored),
            **score_objects(scored, objects), "frames": records, "failed": failed,
            "extract_s": clip.seconds, "propagate_s": seconds,
            "frames_per_s": predicted / (clip.seconds + seconds) if predicted else None,
            "strip": "strip.png" if thumbnails else None, "strip_frames": strip_frames}


def video_encoder(options: dict[str, Any]) -> Encoder:
    """The encoder that `from_examples` options name (backbone, weights, pretrained, seed, backbone_kwargs, device),
    loaded on its device; an Encoder or a module is wrapped as it is."""
    backbone, device = options.get("backbone", "dinov2_vits14"), resolve_device(options.get("device", "auto"))
    if not isinstance(backbone, str):
        return create_encoder(backbone, device=device)
    return create_encoder(backbone, device=device, weights=options.get("weights"),
                          pretrained=options.get("pretrained", True), seed=options.get("seed", 0),
                          **(options.get("backbone_kwargs") or {}))


def clip_segmenters(files: Sequence[Path], annotated: dict[str, Path], protocols: Sequence[VideoProtocol],
                    whiten_on: WhitenOn = "examples", **options: Any
                    ) -> tuple[list[InContextSegmenter], TransformOptions | None]:
    """One segmenter per protocol, built from the annotated frames at the protocol's input size (an `input_size`
    option wins; features default to VIDEO_FEATURES); protocols of one input size share it, and the encoder is
    loaded once. With `whiten_on="clip"`
    a feature transform of the options is not fitted on the annotated frames: the segmenters hold raw features
    and its options are returned, for `clip_transformed` once the clip's features are extracted."""
    features = options.get("features") or VIDEO_FEATURES
    refit = features.transform if whiten_on == "clip" and features.transform.pca else None
    if refit is not None:
        features = dataclasses.replace(features, transform=TransformOptions(pca=False))
    options = {**options, "features": features}
    encoder = video_encoder(options)
    frame = header_size(files[0], "frame", orient=True)
    sizes = [options.get("input_size") or (None if p.resolution is None else
                                           network_size(frame, encoder.patch_size, p.resolution)) for p in protocols]
    examples = [path for path in files if path.stem in annotated]
    built = {size: InContextSegmenter.from_examples(examples, [annotated[p.stem] for p in examples],
                                                    **{**options, "backbone": encoder, "input_size": size})
             for size in dict.fromkeys(sizes)}
    return [built[size] for size in sizes], refit


def clip_features(segmenter: InContextSegmenter, files: Sequence[Path], batch_size: int, failed: list[Failure],
                  refit: TransformOptions | None, seed: int = 0) -> tuple[InContextSegmenter, ClipFeatures]:
    """The clip's features (`extract_clip`) and the segmenter that uses them: with `refit` (from `clip_segmenters`)
    both go through a transform fitted on those features (`clip_transformed`)."""
    clip = extract_clip(segmenter, files, batch_size, failed)
    return (segmenter, clip) if refit is None else clip_transformed(segmenter, clip, refit, seed)


def clip_transformed(segmenter: InContextSegmenter, clip: ClipFeatures, options: TransformOptions, seed: int = 0
                     ) -> tuple[InContextSegmenter, ClipFeatures]:
    """`segmenter` (raw features) and `clip` through a transform of `options` fitted on a seeded sample of the patch
    features of every frame of the clip (no labels): its memory bank and every frame in one space."""
    rows = torch.cat([clip.features[index] for index in sorted(clip.features)])  # (frames x N, D)
    if too_few_rows(*rows.shape, options):
        return segmenter, clip
    transform = FeatureTransform.fit_sample(rows, options, seed)
    log.info("fitted the feature transform on %d patches of %d frames", transform.recipe["fitted_rows"],
             len(clip.features))
    bank, extractor = transformed(segmenter.bank, segmenter.extractor, transform)
    fitted = InContextSegmenter(extractor, bank, segmenter.input_size, normalize=segmenter.normalize,
                                retrieval=segmenter.retrieval, transfer=segmenter.transfer_options,
                                match_orientation=segmenter.match_orientation, device=segmenter.device,
                                timings=segmenter.timings, non_finite=segmenter.non_finite)
    features = {index: transform(rows).to(torch.float16) for index, rows in clip.features.items()}
    return fitted, dataclasses.replace(clip, features=features)


def run_video(frames: str | Path, masks: str | Path, out: str | Path, annotate: str = "all",
              protocol: str | VideoProtocol = "first", overrides: dict[str, Any] | None = None, batch_size: int = 8,
              whiten_on: WhitenOn = "examples", **options: Any) -> dict[str, Any]:
    """Build the memory from the annotated frames, segment the clip into `out` with `protocol` (a name of
    VIDEO_PROTOCOLS or a VideoProtocol) and its `overrides` (VideoProtocol fields), write `<out>/summary.json`.

    `options` go to `InContextSegmenter.from_examples` (an `input_size` there wins over the protocol's
    resolution); a feature transform there is fitted on the annotated frames' patches (`whiten_on="examples"`)
    or on every frame's (`"clip"`); returns the summary.
    """
    start = time.perf_counter()
    out = Path(out)
    name = protocol if isinstance(protocol, str) else "custom"
    protocol = video_protocol(protocol, **(overrides or {}))
    files, annotated, truth = video_inputs(frames, masks, annotate)
    log.info("%d frames, %d annotated, %d to score; protocol %s", len(files), len(annotated), len(truth), name)
    [segmenter], refit = clip_segmenters(files, annotated, [protocol], whiten_on, **options)
    failed: list[Failure] = []
    segmenter, features = clip_features(segmenter, files, batch_size, failed, refit, options.get("seed", 0))
    clip = segment_clip(segmenter, files, annotated, truth, out, protocol, features, failed)
    summary = {"frames": str(frames), "masks": str(masks), "annotate": annotate, "protocol": name,
               "protocol_options": protocol.to_dict(), "whiten_on": whiten_on, "annotated": sorted(annotated),
               "segmenter": segmenter.describe(), "video": clip, "jf_mean": clip["jf_mean"], "j_mean": clip["j_mean"],
               "f_mean": clip["f_mean"], "timings": {**segmenter.timings, "total_s": time.perf_counter() - start},
               "versions": versions()}
    write_json(out / "summary.json", summary)
    return summary

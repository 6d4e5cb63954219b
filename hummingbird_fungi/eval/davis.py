"""DAVIS semi-supervised video object segmentation of any encoder: the first frame's objects propagated through
each sequence by a video protocol, scored by J and F as davis2017-evaluation (docs/protocol.md#video-segmentation).

`run_davis` runs a DAVIS folder (the command line's `hbfungi video --davis`); `davis_evaluation` is the one call
for any model, beside `hbird_evaluation`.
"""

from __future__ import annotations

import csv
import io
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from hummingbird_fungi.config.schema import FeatureOptions
from hummingbird_fungi.data.transforms import read_mask
from hummingbird_fungi.errors import ConfigError, DataError
from hummingbird_fungi.fileio import make_dirs, write_atomic, write_json
from hummingbird_fungi.models.factory import create_encoder
from hummingbird_fungi.runtime import versions
from hummingbird_fungi.segment.folders import Failure
from hummingbird_fungi.segment.segmenter import InContextSegmenter
from hummingbird_fungi.segment.video import (ClipFeatures, VideoProtocol, WhitenOn, clip_features, clip_segmenters,
                                             segment_clip, video_encoder, video_inputs, video_protocol)

log = logging.getLogger(__name__)

VOID = 255  # DAVIS-2017's void id
SCORES = ("jf_mean", "j_mean", "j_recall", "f_mean", "f_recall")  # the columns papers report
CLIP = tuple[list[Path], dict[str, Path], dict[str, Path], int]  # frames, first mask, masks to score, objects


def davis_folders(root: str | Path) -> tuple[Path, Path]:
    """(frames root, masks root) of a DAVIS folder: JPEGImages/ and Annotations/, or their 480p level."""
    root = Path(root)
    images, annotations = root / "JPEGImages", root / "Annotations"
    if not images.is_dir():
        raise DataError(f"{root} is no DAVIS folder: {images} does not exist (expected JPEGImages/<sequence>/ "
                        f"and Annotations/<sequence>/, or their 480p level)")
    if (images / "480p").is_dir():
        images, annotations = images / "480p", annotations / "480p"
    return images, annotations


def davis_clips(root: str | Path, sequences: Sequence[str] | None = None) -> dict[str, CLIP]:
    """Sequence -> (frames, first mask, masks scored: every frame's but the first and the last, number of objects:
    the largest id of the first mask) of a DAVIS folder, every header read; a DataError naming the path for an
    unknown sequence, a missing annotation folder or first mask, or a first mask without an object."""
    images, annotations = davis_folders(root)
    available = sorted(path.name for path in images.iterdir() if path.is_dir())
    clips = {}
    for name in sequences or available:
        if name not in available:
            raise DataError(f"no sequence {name!r} in {images} ({images / name} is not a folder); sequences: "
                            f"{', '.join(available[:10])}{' ...' if len(available) > 10 else ''}")
        if not (annotations / name).is_dir():
            raise DataError(f"no annotations for sequence {name}: {annotations / name} is not a folder")
        files, first, truth = video_inputs(images / name, annotations / name, "first")
        truth.pop(files[-1].stem, None)  # davis2017-evaluation scores frames 1 .. N-2
        mask = read_mask(first[files[0].stem])
        objects = int(mask[mask != VOID].max(initial=0))
        if objects == 0:
            raise DataError(f"the first mask {first[files[0].stem]} holds no object id (only 0 and void {VOID}); "
                            f"DAVIS masks hold object ids 1, 2, ... (binary 0/255 masks: write the object as 1)")
        clips[name] = (files, first, truth, objects)
    return clips


def run_davis(root: str | Path, out: str | Path, protocols: Mapping[str, VideoProtocol] | Sequence[str] = ("dino",),
              sequences: Sequence[str] | None = None, batch_size: int = 8, whiten_on: WhitenOn = "examples",
              **options: Any) -> dict[str, Any]:
    """Segment every sequence of a DAVIS folder with each protocol (name -> VideoProtocol, or registered names)
    and score it; write `<out>/[<protocol>/]<seq>/masks/<frame>.png` and `summary.json` (per frame), and
    `<out>/summary.json` and `<out>/table.csv` (per sequence and the means). Protocols of one input size share
    one feature extraction per sequence.

    `options` go to `InContextSegmenter.from_examples` (backbone, weights, features, ...; a feature transform there
    is fitted as `whiten_on` says, see `run_video`); the label space of a sequence is background 0, objects 1..K
    (K the first mask's largest id) and void 255. Returns the summary.
    """
    start = time.perf_counter()
    if not isinstance(protocols, Mapping):
        protocols = {name: video_protocol(name) for name in protocols}
    clips = davis_clips(root, sequences)  # bad input named before the model loads
    out = Path(out)
    options["backbone"] = video_encoder(options)
    results: dict[str, dict[str, Any]] = {name: {} for name in protocols}
    segmenter = None
    for sequence, (files, first, truth, objects) in clips.items():
        log.info("sequence %s: %d frames, %d objects", sequence, len(files), objects)
        space = {"num_classes": objects + 1, "ignore_index": VOID,
                 "class_names": ["background", *(f"object_{i}" for i in range(1, objects + 1))]}
        segmenters, refit = clip_segmenters(files, first, list(protocols.values()), whiten_on, **options, **space)
        extracted: dict[int, tuple[InContextSegmenter, ClipFeatures, list[Failure]]] = {}
        for (name, protocol), built in zip(protocols.items(), segmenters):
            if id(built) not in extracted:  # one extraction (and clip transform) per input size
                failed: list[Failure] = []
                extracted[id(built)] = (*clip_features(built, files, batch_size, failed, refit,
                                                       options.get("seed", 0)), failed)
            segmenter, clip, failed = extracted[id(built)]
            where = out / name / sequence if len(protocols) > 1 else out / sequence
            video = segment_clip(segmenter, files, first, truth, where, protocol, clip, failed, overlays=False)
            write_json(where / "summary.json", {"sequence": sequence, "protocol": name,
                                                "protocol_options": protocol.to_dict(), "video": video})
            results[name][sequence] = {**{key: video[key] for key in SCORES}, "objects": video["objects"],
                                       "frames_scored": video["num_scored"],
                                       "frames_predicted": video["num_segmented"] - video["num_annotated"],
                                       "seconds": video["extract_s"] + video["propagate_s"],
                                       "frames_per_s": video["frames_per_s"], "failed": video["failed"]}
            log.info("%s %s: J&F %.3f", name, sequence, video["jf_mean"] or float("nan"))
    summary = {"davis": str(root), "sequences": list(clips), "whiten_on": whiten_on,
               "protocols": {name: {"options": protocol.to_dict(), "sequences": results[name],
                                    "mean": mean_scores(results[name])} for name, protocol in protocols.items()},
               "segmenter": segmenter.describe() if segmenter else None,
               "total_s": time.perf_counter() - start, "versions": versions()}
    make_dirs(out, inside=out)
    write_json(out / "summary.json", summary)
    write_atomic(out / "table.csv", table_csv(summary).encode())
    return summary


def mean_scores(sequences: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """Means over every object of every sequence (as davis2017-evaluation), and predicted frames per second of
    reading, extraction and propagation over all sequences."""
    means: dict[str, float | None] = {}
    for key in SCORES[1:]:
        values = [obj[key] for row in sequences.values() for obj in row["objects"].values() if obj[key] is not None]
        means[key] = float(np.mean(values)) if values else None
    both = means["j_mean"] is not None and means["f_mean"] is not None
    seconds = sum(row["seconds"] for row in sequences.values())
    frames = sum(row["frames_predicted"] for row in sequences.values())
    return {"jf_mean": (means["j_mean"] + means["f_mean"]) / 2 if both else None, **means,
            "frames_per_s": frames / seconds if seconds and frames else None}


def table_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (protocol, sequence) and one `mean` row per protocol: the DAVIS scores and frames per second."""
    rows = []
    for name, protocol in summary["protocols"].items():
        for sequence, row in [*protocol["sequences"].items(), ("mean", protocol["mean"])]:
            rows.append({"protocol": name, "sequence": sequence, **{key: row[key] for key in SCORES},
                         "frames_per_s": row["frames_per_s"]})
    return rows


def table_csv(summary: Mapping[str, Any]) -> str:
    """The per-sequence table as CSV."""
    buffer = io.StringIO()
    rows = table_rows(summary)
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def format_table(summary: Mapping[str, Any]) -> str:
    """The table papers print (J&F-mean, J-mean, J-recall, F-mean, F-recall, in %) per protocol and sequence."""
    heads = ("J&F-mean", "J-mean", "J-recall", "F-mean", "F-recall", "fps")
    width = max(len(row["sequence"]) for row in table_rows(summary)) + 2
    lines = []
    for name in summary["protocols"]:
        lines.append(f"{'protocol ' + name:<{width}}" + "".join(f"{head:>10}" for head in heads))
        for row in (r for r in table_rows(summary) if r["protocol"] == name):
            cells = ["n/a" if row[key] is None else f"{100 * row[key]:.1f}" for key in SCORES]
            fps = "n/a" if row["frames_per_s"] is None else f"{row['frames_per_s']:.2f}"
            lines.append(f"{row['sequence']:<{width}}" + "".join(f"{cell:>10}" for cell in (*cells, fps)))
    return "\n".join(lines)


def davis_evaluation(model: Any, data_dir: str | Path, protocol: str | VideoProtocol = "dino",
                     sequences: Sequence[str] | None = None, out: str | Path | None = None, *,
                     features: FeatureOptions | None = None, ftr_extr_fn: Callable | None = None,
                     patch_size: int | None = None, d_model: int | None = None, device: str = "auto",
                     batch_size: int = 8, return_details: bool = False, **overrides: Any
                     ) -> float | tuple[float, dict[str, Any]]:
    """DAVIS J&F-mean of any encoder, as `hbird_evaluation` takes it: a timm, hub or torchvision model, an Encoder,
    or a module with `ftr_extr_fn` (with `patch_size`, `d_model`); `features` (e.g. FUNGI) as for `evaluate`.

    `protocol` is a name of VIDEO_PROTOCOLS (default `dino`) or a VideoProtocol, `overrides` its fields (k=...,
    radius=...); `data_dir` a DAVIS folder; masks go to `out` (default: a temporary folder, removed). Returns
    J&F-mean, or (J&F-mean, summary) with `return_details`.
    """
    encoder = (create_encoder(model, feature_fn=ftr_extr_fn, patch_size=patch_size, embed_dim=d_model)
               if ftr_extr_fn is not None else create_encoder(model))
    if patch_size is not None and encoder.patch_size != patch_size:
        raise ConfigError(f"the model has patch size {encoder.patch_size}, not patch_size={patch_size}")
    name = protocol if isinstance(protocol, str) else "custom"
    chosen = {name: video_protocol(protocol, **overrides)}
    options = {"backbone": encoder, "device": device, "features": features or FeatureOptions()}  # raw: the benchmark's
    if out is not None:
        summary = run_davis(data_dir, out, chosen, sequences, batch_size, **options)
    else:
        with tempfile.TemporaryDirectory(prefix="davis_") as folder:
            summary = run_davis(data_dir, folder, chosen, sequences, batch_size, **options)
    score = summary["protocols"][name]["mean"]["jf_mean"]
    return (score, summary) if return_details else score

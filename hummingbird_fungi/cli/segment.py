"""`hbfungi segment` and `hbfungi demo`: options in, a folder run out (the logic is in segment.folders)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from hummingbird_fungi.cli.output import print_metrics, write_results
from hummingbird_fungi.config.loader import overrides_to_dict, parse_override
from hummingbird_fungi.config.schema import FeatureOptions, check_device, parse_size
from hummingbird_fungi.config.typed import Check, at_least, positive
from hummingbird_fungi.errors import ConfigError, DataError
from hummingbird_fungi.segment import defaults
from hummingbird_fungi.segment.defaults import (MIN_ROWS_PER_DIM, SEGMENT_DATA, SEGMENT_KIND, SEGMENT_MEMORY,
                                                SEGMENT_RETRIEVAL, SEGMENT_TRANSFER, SEGMENT_WHITEN, VIDEO_WHITEN)

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("masks", "overlays", "summary.json", "grid.png", "per_class_iou.png", "miou_vs_memory.png")

DEMO_PRETRAINED = "dinov2_vits14"  # used by the demo when its hub weights are already cached
DEMO_BACKBONE = "vit_tiny_patch16_224"  # else a random tiny ViT
DEMO_BACKBONE_KWARGS = {"patch_size": 8, "depth": 4}
DEMO_LONG_SIDE = 224
DEMO_SWEEP = (64, 16, 4)  # memory sizes of the demo's sweep, as divisors of the full bank


def checked(kind: Callable[[str], Any], check: Check) -> Callable[[str], Any]:
    """An argparse type: the flag's text as `kind` (int, float, str or a parser) passing `check` (finite and in
    range for numbers); otherwise argparse names the flag and exits with status 2, before any model loads."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError as error:
            words = {int: "expected an integer", float: "expected a number"}
            raise argparse.ArgumentTypeError(f"{text!r}: {words.get(kind, error)}") from error
        problem = check(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
        return value
    return parse


def input_size(text: str) -> tuple[int, int]:
    """--input-size text: 'HxW' (height first) or an int (square) as (H, W)."""
    try:
        return parse_size(int(text) if text.isdigit() else text)
    except ValueError as error:
        raise ValueError("expected HxW (height first) or an integer, e.g. 336x448") from error


def backbone_option(text: str) -> str:
    """An argparse type: a --backbone-option KEY=VALUE whose value timm can take (sizes positive integers,
    numbers finite), kept as given."""
    from hummingbird_fungi.models.backbones import backbone_option_problem

    try:
        keys, value = parse_override(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    problem = backbone_option_problem(".".join(keys), value)
    if problem:
        raise argparse.ArgumentTypeError(f"{text}: {problem}")
    return text


@contextmanager
def flag_named(flag: str) -> Iterator[None]:
    """A ConfigError raised inside, with the command-line flag (and value) that caused it named first."""
    try:
        yield
    except ConfigError as error:
        raise ConfigError(f"{flag}: {error}") from error


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Backbone, features, retrieval and batching options shared by `segment` and `demo`."""
    parser.add_argument("--backbone", help="backbone name, e.g. dinov2_vits14, dino_vits16 (default: the bank's, "
                                           "else dinov2_vits14)")
    parser.add_argument("--weights", type=Path, help="local checkpoint (timm or original FAIR layout)")
    parser.add_argument("--random-init", action="store_true", help="no pretrained weights (smoke tests only)")
    parser.add_argument("--backbone-option", action="append", metavar="KEY=VALUE", type=backbone_option,
                        help="timm model keyword, e.g. depth=4 (repeatable)")
    parser.add_argument("--features", choices=("embeddings", "fungi"),
                        help=f"patch features: plain embeddings or FUNGI (default {SEGMENT_KIND})")
    parser.add_argument("--feature-option", action="append", metavar="KEY=VALUE",
                        help="FUNGI option, e.g. negatives=support (repeatable)")
    parser.add_argument("--whiten", action=argparse.BooleanOptionalAction,
                        help="whiten the features with a PCA fitted on the example patches (features.transform; "
                             f"default for segment and demo {'on' if SEGMENT_WHITEN else 'off'} when the examples "
                             f"give at least {MIN_ROWS_PER_DIM:g} patches per feature, for video "
                             f"{'on' if VIDEO_WHITEN else 'off'}; --whiten: whatever their number)")
    parser.add_argument("--whiten-dims", type=checked(int, at_least(1)), metavar="N",
                        help="with --whiten: keep the N axes of largest variance (default: every axis)")
    parser.add_argument("--input-size", type=checked(input_size, positive),
                        help="network input HxW (height first), multiples of the patch (default: long side 448, "
                             "the examples' aspect)")
    parser.add_argument("--k", type=checked(int, at_least(1)), help=f"neighbours per patch (default {SEGMENT_RETRIEVAL.k})")
    parser.add_argument("--temperature", type=checked(float, positive),
                        help=f"softmax temperature (default {SEGMENT_TRANSFER.temperature:g})")
    parser.add_argument("--tune", action="store_true",
                        help="choose features, whitening, k and temperature on the examples (each held out in turn; "
                             "hbfungi tune's grid) before the bank is built")
    parser.add_argument("--backend", help="retrieval backend: exact, torch, faiss, faiss_ivfpq, ... (default "
                                          f"{SEGMENT_RETRIEVAL.backend})")
    parser.add_argument("--memory-size", type=checked(int, at_least(1)),
                        help="memory-bank rows (default: every example patch)")
    parser.add_argument("--augmentation-epochs", type=checked(int, at_least(0)), default=0,
                        help="augmented passes over the examples (default 0: one pass, no augmentation)")
    parser.add_argument("--batch-size", type=checked(int, at_least(1)), default=4)
    parser.add_argument("--device", type=checked(str, check_device), default="auto", help="cpu, cuda or auto")
    parser.add_argument("--seed", type=checked(int, at_least(0)), default=0)
    parser.add_argument("--grid-rows", type=checked(int, at_least(0)), default=6,
                        help="images in the overlay grid (0: no grid)")


def add_label_space_args(parser: argparse.ArgumentParser) -> None:
    """--num-classes, --ignore-index and --class-names (they win over dataset.yaml)."""
    parser.add_argument("--num-classes", type=checked(int, at_least(1)),
                        help="classes (default: dataset.yaml, else largest id + 1)")
    parser.add_argument("--ignore-index", type=checked(int, at_least(0)),
                        help="void id of the example masks (255 is void by default)")
    parser.add_argument("--class-names", help="comma-separated class names, id order")


def segmenter_options(args: argparse.Namespace, features: FeatureOptions | None = None) -> dict[str, Any]:
    """The flags shared by segment, demo and video as `InContextSegmenter.from_examples` keywords and sections;
    `features` holds the command's defaults of what the flags leave out (kind, whitening; SEGMENT_FEATURES)."""
    from hummingbird_fungi.config.schema import DataOptions, FungiOptions, SupportOptions
    from hummingbird_fungi.eval.tune import ExampleTuner

    features = features or defaults.SEGMENT_FEATURES
    if args.weights is not None and not args.weights.is_file():
        raise DataError(f"weights file {args.weights} does not exist")
    if args.feature_option and (args.features or features.kind) != "fungi":
        raise ConfigError(f"--feature-option {args.feature_option} given for {args.features!r} features")
    whiten = whitening(args, features)
    if args.whiten_dims is not None and not whiten:
        raise ConfigError(f"--whiten-dims {args.whiten_dims} needs --whiten")
    kind = args.features or features.kind
    with flag_named(f"--feature-option {' '.join(args.feature_option or [])}"):
        fungi = FungiOptions.from_mapping(overrides_to_dict(args.feature_option))
    with flag_named(f"--backend {args.backend}"):
        retrieval = dataclasses.replace(SEGMENT_RETRIEVAL, backend=args.backend or SEGMENT_RETRIEVAL.backend,
                                        k=SEGMENT_RETRIEVAL.k if args.k is None else args.k)
    epochs = args.augmentation_epochs
    return {"weights": args.weights, "pretrained": not args.random_init,
            "backbone_kwargs": overrides_to_dict(args.backbone_option), "input_size": args.input_size,
            "features": dataclasses.replace(features, kind=kind, fungi=fungi,
                                            support=SupportOptions(size=args.memory_size),
                                            transform=dataclasses.replace(  # --whiten: whatever the row count
                                                features.transform, pca=whiten, dims=args.whiten_dims,
                                                min_rows_per_dim=None if args.whiten else
                                                features.transform.min_rows_per_dim)),
            "memory": dataclasses.replace(SEGMENT_MEMORY, size=args.memory_size, augment=epochs > 0,
                                          augmentation_epochs=max(epochs, 1)),
            "retrieval": retrieval,
            "transfer": dataclasses.replace(SEGMENT_TRANSFER, temperature=SEGMENT_TRANSFER.temperature
                                            if args.temperature is None else args.temperature),
            "tune": ExampleTuner() if args.tune else None,
            "data": DataOptions(**{**SEGMENT_DATA.to_dict(), "batch_size": args.batch_size}),
            "device": args.device, "seed": args.seed}


def whitening(args: argparse.Namespace, features: FeatureOptions) -> bool:
    """Whether the features are whitened: --whiten / --no-whiten, else the command's default `features`."""
    return features.transform.pca if args.whiten is None else args.whiten


def label_space_flags(args: argparse.Namespace) -> dict[str, Any]:
    """num_classes / ignore_index / class_names given as flags (they win over dataset.yaml)."""
    space: dict[str, Any] = {}
    if args.num_classes is not None:
        space["num_classes"] = args.num_classes
    if args.ignore_index is not None:
        space["ignore_index"] = args.ignore_index
    if args.class_names is not None:
        space["class_names"] = [name.strip() for name in args.class_names.split(",")]
    return space


def build_segmenter(args: argparse.Namespace, examples: Path | None, bank: Path | None,
                    **overrides: Any) -> tuple[Any, list[dict[str, str]]]:
    """The segmenter of --examples (unreadable pairs skipped and returned) or of the saved bank --memory;
    `overrides` replace `from_examples` keywords (the memory section included)."""
    from hummingbird_fungi.segment.folders import segmenter_from_folder
    from hummingbird_fungi.segment.segmenter import InContextSegmenter

    options = {**segmenter_options(args), "backbone": args.backbone or "dinov2_vits14", **overrides}
    if bank is not None:
        segmenter = InContextSegmenter.from_memory(
            bank, backbone=args.backbone, weights=options["weights"], retrieval=options["retrieval"],
            transfer=options["transfer"], device=options["device"], input_size=options["input_size"])
        return segmenter, []
    return segmenter_from_folder(examples, args.examples_split, **options, **label_space_flags(args))


def finish(summary: dict[str, Any], out: Path) -> None:
    """Write `<out>/summary.json`, print the metrics and where everything is."""
    write_results(summary, out / "summary.json")
    if "metrics" in summary:
        print_metrics(summary["metrics"])
    failed = summary["segment"]["failed"] + summary.get("failed_examples", [])
    for failure in failed:
        print(f"skipped {failure['file']}: {failure['error']}")
    print(f"{summary['segment']['num_segmented']}/{summary['segment']['num_images']} images segmented -> "
          f"{out / 'masks'}, {out / 'overlays'}; grid {out / 'grid.png'}; summary {out / 'summary.json'}")
    if summary["segment"]["num_segmented"] == 0:
        raise DataError(f"none of the {summary['segment']['num_images']} images of {summary['images']} could be "
                        f"segmented (see the skipped files above and {out / 'summary.json'})")


def refuse_links(out: Path, names: Sequence[str]) -> None:
    """Refuse output folders of `out` that are symbolic links: outputs are never written through a link."""
    for folder in (out / name for name in names):
        if folder.is_symlink():
            raise ConfigError(f"--out {out}: {folder} is a symbolic link; outputs are never written through a "
                              f"link, remove it or choose another --out")


def check_paths(args: argparse.Namespace, examples: Path | None, memory: Path | None, images: str | Path,
                files: Sequence[Path], ground_truth: Path | None, out: Path, weights: Path | None) -> None:
    """Before any model loads: inputs exist, --out and --save-memory can be written, and no output is, lies
    inside or contains an input (examples, images, ground truth, bank, weights; symlinks resolved)."""
    from hummingbird_fungi.fileio import check_no_overlap, check_output_dir, preflight
    from hummingbird_fungi.memory.bank import partial_path, read_manifest

    check_output_dir(out, "--out")
    outputs = {f"--out {name}": out / name for name in OUTPUT_NAMES}
    refuse_links(out, ("masks", "overlays"))
    image_inputs = ({"--images": (images, "dir")} if Path(images).is_dir()
                    else {f"--images ({file.name})": (file, "file") for file in files})
    inputs = preflight({"--examples": (examples, "dir"), "--ground-truth": (ground_truth, "dir"),
                        "--weights": (weights, "file"), **image_inputs},
                       {key: (path, "file" if path.suffix else "dir") for key, path in outputs.items()})
    if memory is not None:
        read_manifest(memory)
        inputs["--memory"] = memory
        check_no_overlap(outputs, inputs)
    save = args.save_memory
    if save is None:
        return
    if Path(save).exists():
        raise ConfigError(f"--save-memory {save} already exists; remove it or choose another path")
    check_output_dir(save, "--save-memory")
    check_no_overlap({"--save-memory": save, "--save-memory (unfinished)": partial_path(save)}, {**inputs, **outputs})
    if out.resolve().is_relative_to(Path(save).resolve()):
        raise ConfigError(f"--out {out} is or lies inside --save-memory {save}; choose two separate locations")


def run_segment(args: argparse.Namespace, examples: Path | None, memory: Path | None, images: Path,
                ground_truth: Path | None, out: Path, notes: Sequence[str] = (),
                **overrides: Any) -> tuple[dict[str, Any], Any]:
    """Build or load the segmenter, segment the image folder; the summary and the segmenter."""
    from hummingbird_fungi.data.segmentation import IMAGE_EXTENSIONS
    from hummingbird_fungi.segment.folders import list_images, masks_by_stem, segment_folder

    start = time.perf_counter()
    listing = list_images(images)  # a bad --images or --ground-truth is reported before any model loads
    if not listing[0]:
        raise DataError(f"no images to segment in {images} (extensions {', '.join(IMAGE_EXTENSIONS)}); "
                        f"{len(listing[2])} other files ignored")
    masks_by_stem(ground_truth)
    check_paths(args, examples, memory, images, listing[0], ground_truth, out,
                overrides.get("weights", args.weights))
    segmenter, failed_examples = build_segmenter(args, examples, memory, **overrides)
    if args.save_memory is not None:
        segmenter.save(args.save_memory)
    record = {"notes": list(notes), "examples": None if examples is None else str(examples),
              "memory": None if memory is None else str(memory), "failed_examples": failed_examples}
    summary = segment_folder(segmenter, images, out, ground_truth, args.batch_size, args.grid_rows, record, listing)
    summary["timings"]["total_s"] = time.perf_counter() - start
    return summary, segmenter


def cmd_segment(args: argparse.Namespace) -> None:
    """`hbfungi segment`."""
    if (args.examples is None) == (args.memory is None):
        raise ConfigError("pass exactly one of --examples DIR and --memory PATH")
    if args.memory is not None and args.whiten:
        raise ConfigError(f"--whiten applies to a bank built from --examples; --memory {args.memory} applies the "
                          f"transform it was saved with (--whiten --save-memory)")
    if args.memory is not None and args.tune:
        raise ConfigError(f"--tune chooses how a bank is built from --examples; --memory {args.memory} is built")
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
    from hummingbird_fungi.models.backbones import hub_weights_cached
    from hummingbird_fungi.fileio import check_output_dir
    from hummingbird_fungi.segment.demo_data import write_demo_data

    sources = demo_sources(args)
    out: Path = args.out
    notes, overrides = [], {}
    if sources["examples"] is None:
        check_output_dir(out, "--out")  # before the synthetic data is written into it
        dirs = write_demo_data(out / "data", seed=args.seed)
        examples, images, ground_truth = dirs["examples"], dirs["images"], dirs["ground_truth"]
        notes.append(f"DATA IS SYNTHETIC: procedurally generated street-like scenes "
                     f"(hummingbird_fungi.segment.demo_data, "
                     f"seed {args.seed}) under {out / 'data'}; not real photographs")
    else:
        examples, images, ground_truth = sources["examples"], sources["images"], args.ground_truth
        notes.append(f"data: examples {examples}, images {images}")
    overrides["weights"] = sources["weights"]
    if sources["backbone"] is None and hub_weights_cached(DEMO_PRETRAINED):
        overrides["backbone"] = DEMO_PRETRAINED
        notes.append(f"backbone: pretrained {DEMO_PRETRAINED} from the local hub cache (found without network)")
    elif sources["backbone"] is None:
        overrides.update(backbone=DEMO_BACKBONE, pretrained=False, long_side=DEMO_LONG_SIDE,
                         backbone_kwargs={**DEMO_BACKBONE_KWARGS, **overrides_to_dict(args.backbone_option)})
        notes.append(f"WEIGHTS ARE RANDOM: a randomly initialised {DEMO_BACKBONE} "
                     f"({DEMO_BACKBONE_KWARGS}), no pretrained weights; the masks show the pipeline at work, "
                     f"not what a trained ViT does (pass --backbone/--weights or HBFUNGI_BACKBONE/HBFUNGI_WEIGHTS)")
    else:
        overrides["backbone"] = sources["backbone"]
        described = sources["weights"] if sources["weights"] is not None else (
            "random init" if args.random_init else "pretrained hub weights")
        notes.append(f"backbone: {sources['backbone']} with {described}")
    for note in notes:
        log.warning("%s", note)
    summary, segmenter = run_segment(args, examples, None, images, ground_truth, out, notes=notes, **overrides)
    if "metrics" in summary and summary["metrics"]["miou"] is not None:
        from hummingbird_fungi.segment.folders import sweep_and_plot

        build = {**overrides, "backbone": segmenter.backbone}
        memory = segmenter_options(args)["memory"]
        summary["memory_sweep"] = sweep_and_plot(
            lambda size: build_segmenter(args, examples, None, memory=dataclasses.replace(memory, size=size),
                                         **build)[0], summary, images, ground_truth, DEMO_SWEEP,
            out / "miou_vs_memory.png", summary["segmenter"]["features"]["kind"], args.batch_size)
    finish(summary, out)
    for note in notes:
        print(note)


# --------------------------------------------------------------------------- video


def protocol_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `VideoProtocol` fields given as flags (they win over the --protocol preset)."""
    given = {"k": args.k, "temperature": args.temperature, "propagate": args.propagate, "radius": args.radius,
             "first_radius": args.first_radius, "first_labels": args.first_labels, "resolution": args.resolution}
    return {key: value for key, value in given.items() if value is not None}


def video_features(args: argparse.Namespace) -> FeatureOptions:
    """The video command's default features: a user's (VIDEO_FEATURES) for --frames; for --davis (a benchmark) raw
    embeddings, as `davis_evaluation`, unless --features or --whiten say otherwise."""
    video = defaults.VIDEO_FEATURES
    if args.davis is None:
        return video
    return FeatureOptions(support=video.support, transform=dataclasses.replace(video.transform, pca=False))


def video_segmenter_options(args: argparse.Namespace, protocol: Any) -> dict[str, Any]:
    """`segmenter_options` of the video flags, retrieval k and temperature those of `protocol`."""
    return segmenter_options(argparse.Namespace(**{**vars(args), "k": protocol.k, "temperature": protocol.temperature}),
                             video_features(args))


def cmd_video(args: argparse.Namespace) -> None:
    """`hbfungi video`: segment a clip from its annotated frames, or every sequence of a DAVIS folder (the logic is
    in segment.video and eval.davis); frames that could not be segmented are printed, and make it fail (exit 2)
    once the summary is written."""
    from hummingbird_fungi.fileio import check_output_dir, preflight
    from hummingbird_fungi.segment.video import run_video, video_inputs, video_protocol

    if (args.davis is None) == (args.frames is None or args.masks is None) or (args.davis and (args.frames or
                                                                                               args.masks)):
        raise ConfigError("pass --davis ROOT, or --frames DIR with --masks DIR")
    if args.tune:
        raise ConfigError("--tune holds annotated images out in turn, and a video protocol sets k and temperature: "
                          "tune on annotated frames with `hbfungi segment --examples DIR --tune` and pass its "
                          "choice as --features/--whiten/--k/--temperature")
    if args.whiten_on == "clip" and not whitening(args, video_features(args)):
        raise ConfigError("--whiten-on clip fits the whitening on the clip: it needs --whiten")
    with flag_named(f"--protocol {' '.join(args.protocol or [])}"):
        protocols = {name: video_protocol(name, **protocol_overrides(args))
                     for name in args.protocol or (["dino"] if args.davis else ["first"])}
    check_output_dir(args.out, "--out")
    if args.davis is not None:
        run_davis_command(args, protocols)
        return
    if len(protocols) > 1 or args.sequence:
        raise ConfigError("several --protocol names and --sequence go with --davis; --frames takes one protocol")
    refuse_links(args.out, ("masks", "overlays"))
    preflight({"--frames": (args.frames, "dir"), "--masks": (args.masks, "dir"), "--weights": (args.weights, "file")},
              {f"--out {name}": (args.out / name, "file" if "." in name else "dir")
               for name in ("masks", "overlays", "strip.png", "summary.json")})
    annotate = args.annotate or "all"
    video_inputs(args.frames, args.masks, annotate)  # a missing first mask, a bad file or size: before the model
    [(name, protocol)] = protocols.items()
    options = {**video_segmenter_options(args, protocol), "backbone": args.backbone or "dinov2_vits14",
               **label_space_flags(args)}
    summary = run_video(args.frames, args.masks, args.out, annotate, name, protocol_overrides(args),
                        args.batch_size, args.whiten_on, **options)
    clip = summary["video"]
    for failure in clip["failed"]:
        print(f"skipped {failure['file']}: {failure['error']}")
    scored = "no frame scored" if clip["jf_mean"] is None else (
        f"J&F {100 * clip['jf_mean']:.1f}% (J {100 * clip['j_mean']:.1f}, F {100 * clip['f_mean']:.1f}) over "
        f"{clip['num_scored']} frames")
    fps = "" if clip["frames_per_s"] is None else f"; {clip['frames_per_s']:.2f} frames/s"
    print(f"{clip['num_segmented']}/{clip['num_frames']} frames ({clip['num_annotated']} annotated, protocol {name}) "
          f"-> {args.out / 'masks'}, {args.out / 'overlays'}; {scored}{fps}; summary {args.out / 'summary.json'}")
    if clip["failed"]:
        raise DataError(f"{len(clip['failed'])} of the {clip['num_frames']} frames of {args.frames} could not be "
                        f"segmented (see the skipped frames above and {args.out / 'summary.json'})")


def run_davis_command(args: argparse.Namespace, protocols: dict[str, Any]) -> None:
    """`hbfungi video --davis`: every sequence (or --sequence) with each protocol; prints the DAVIS table."""
    from hummingbird_fungi.eval.davis import davis_clips, format_table, run_davis
    from hummingbird_fungi.fileio import preflight

    if args.annotate == "all" or any(flag is not None for flag in (args.num_classes, args.ignore_index,
                                                                       args.class_names)):
        raise ConfigError("--davis annotates the first frame of each sequence and takes its label space from that "
                          "mask (objects 1..K, void 255): no --annotate all, --num-classes, --ignore-index or "
                          "--class-names")
    preflight({"--davis": (args.davis, "dir"), "--weights": (args.weights, "file")},
              {"--out": (args.out, "dir")})
    davis_clips(args.davis, args.sequence)  # an unknown sequence, a missing folder or first mask: before the model
    options = {**video_segmenter_options(args, next(iter(protocols.values()))),
               "backbone": args.backbone or "dinov2_vits14"}
    summary = run_davis(args.davis, args.out, protocols, args.sequence, args.batch_size, args.whiten_on, **options)
    print(format_table(summary))
    failed = [(name, sequence, failure) for name, protocol in summary["protocols"].items()
              for sequence, row in protocol["sequences"].items() for failure in row["failed"]]
    for name, sequence, failure in failed:
        print(f"skipped ({name}, {sequence}) {failure['file']}: {failure['error']}")
    print(f"masks under {args.out}; table {args.out / 'table.csv'}; summary {args.out / 'summary.json'}")
    if failed:
        raise DataError(f"{len(failed)} frames of {args.davis} could not be segmented (see the skipped frames above "
                        f"and {args.out / 'summary.json'})")


def add_segment_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `segment`, `demo` and `video` to the hbfungi sub-commands."""
    seg = subparsers.add_parser("segment", help="segment a folder of images from a few annotated examples",
                                description="Segment every image of --images with a memory bank built from "
                                            "--examples (images/<stem>.*, masks/<stem>.png) or loaded from --memory.")
    seg.add_argument("--examples", type=Path, help="folder with images/<stem>.* and masks/<stem>.png, or the "
                                                   "folder-dataset layout images/<split>/ + annotations/<split>/; "
                                                   "an optional dataset.yaml there names the classes and void id")
    seg.add_argument("--examples-split", default="train", help="split of a folder-dataset examples layout")
    seg.add_argument("--memory", type=Path, help="a saved memory bank instead of --examples")
    seg.add_argument("--images", required=True, help="images to segment: a folder, one file, or a quoted glob "
                                                       "such as 'photos/*.jpg'")
    seg.add_argument("--out", type=Path, required=True, help="output folder")
    seg.add_argument("--ground-truth", type=Path, help="folder of <stem>.png masks of --images: adds metrics")
    seg.add_argument("--save-memory", type=Path, help="also save the memory bank here (reuse with --memory)")
    add_label_space_args(seg)
    add_model_args(seg)
    seg.set_defaults(func=cmd_segment)

    demo = subparsers.add_parser("demo", help="segment the embedded synthetic scenes (or given folders)",
                                 description="Run `segment` on procedurally generated scenes with a randomly "
                                             "initialised ViT, or on --examples/--images with --backbone/--weights "
                                             "(also HBFUNGI_EXAMPLES, HBFUNGI_IMAGES, HBFUNGI_BACKBONE, "
                                             "HBFUNGI_WEIGHTS). Writes masks, overlays, plots and summary.json.")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default outputs/demo)")
    demo.add_argument("--examples", type=Path, help="examples folder as for segment (default: synthetic)")
    demo.add_argument("--examples-split", default="train", help="split of a folder-dataset examples layout")
    demo.add_argument("--images", help="images to segment: folder, file or glob (default: synthetic)")
    demo.add_argument("--ground-truth", type=Path, help="masks of --images, for metrics")
    add_model_args(demo)
    demo.set_defaults(func=cmd_demo, num_classes=None, ignore_index=None, class_names=None, save_memory=None)

    video = subparsers.add_parser("video", help="segment a video from its annotated frames, or a DAVIS folder",
                                  description="Segment every frame of --frames (sorted by name) from the annotated "
                                              "frames (--masks: <stem>.png, at least the first frame's), or every "
                                              "sequence of a DAVIS folder (--davis) from its first frame, with a "
                                              "video protocol (first: the annotated frames' memory bank; propagate: "
                                              "plus the last predicted frames; dino: DINO's label propagation). "
                                              "Writes masks and summary.json with DAVIS J and F per object against "
                                              "masks not in the memory, and frames per second.")
    video.add_argument("--frames", type=Path, help="folder of frames, sorted by name")
    video.add_argument("--masks", type=Path, help="folder of <stem>.png masks of annotated frames")
    video.add_argument("--davis", type=Path, help="DAVIS folder: JPEGImages/<seq>/ and Annotations/<seq>/ (or their "
                                                 "480p level); first frame annotated, frames 1..N-2 scored")
    video.add_argument("--sequence", action="append", metavar="NAME", help="with --davis: this sequence only "
                                                                           "(repeatable; default every sequence)")
    video.add_argument("--out", type=Path, required=True, help="output folder")
    video.add_argument("--protocol", nargs="+", metavar="NAME",
                       help="video protocol(s): first, propagate, dino (default first, with --davis dino); several "
                            "with --davis share each feature extraction of one input size")
    video.add_argument("--annotate", choices=("all", "first"),
                       help="masks in the memory: all of --masks, or the first frame's only, the others scored "
                            "(default all; --davis: first)")
    video.add_argument("--propagate", type=checked(int, at_least(0)), metavar="N",
                       help="the last N predicted frames join the context (default: the protocol's)")
    video.add_argument("--radius", type=checked(int, at_least(0)), metavar="R",
                       help="predicted frames: only patches within R patches of the query's position "
                            "(default: the protocol's)")
    video.add_argument("--first-radius", type=checked(int, at_least(0)), metavar="R",
                       help="annotated frames in the context within R patches, the memory bank not searched "
                            "(default: the protocol's)")
    video.add_argument("--first-labels", choices=("nearest", "area"),
                       help="with a first radius: annotated patches one-hot at their centre pixel (nearest) or "
                            "class fractions (area) (default: the protocol's)")
    video.add_argument("--resolution", type=checked(int, at_least(1)), metavar="PX",
                       help="short side of the network input in pixels (default: the protocol's; --input-size wins)")
    video.add_argument("--whiten-on", choices=("examples", "clip"), default="examples",
                       help="with whitening: fit it on the annotated frames' patches (examples, default) or on every "
                            "frame's patches of the clip, no labels (clip)")
    add_label_space_args(video)
    add_model_args(video)
    video.set_defaults(func=cmd_video, k=None, temperature=None)  # None: the protocol's

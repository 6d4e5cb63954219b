"""FUNGI study: a grid of patch-feature variants scored against the embeddings with paired bootstrap intervals.

Two protocols:
* a segmentation preset (`--config camvid_dinov2_vits14 data.root=... model.weights=...`): the train
  split is the memory (every patch, and banks of --memory-size rows drawn by the bank builder's rule,
  memory.sampling), the eval split is scored; one confusion matrix per eval image; intervals resample images.
* DAVIS first-frame (`--davis ROOT --weights FILE`): per sequence the first frame's patches are the
  memory and every --frame-step-th later frame is scored at its own size; the score is the mean
  over sequences of each sequence's mean foreground IoU (J); intervals resample sequences.

Each --grad NAME=KEY=VALUE,... is one FUNGI extraction (features.fungi options, e.g. layer=blocks.-1.mlp.fc2
or objective=kl; without layer= the backbone's patch default, attn.qkv on ViTs); its projected gradients,
like the patch tokens of a plain forward pass, are extracted once per image and cached in --cache
(features/cache.py; an interrupted extraction resumes). Each --row is a composition of them (eval/study.py:
'NAME' = embeddings, or 'NAME:grads=a+b,w=0.5,dims=96,pca=256,whiten') scored at every --k and
--temperature from one search. This file parses arguments, runs the tables and prints them; the work is
in eval/study.py and eval/bootstrap.py.
Every row is compared with the row named 'embeddings' at the first --k and --temperature on the same
memory, over the same resamples. Prints the tables and writes them as JSON.

    python tools/fungi_study.py --config camvid_dinov2_vits14 --cache runs/study_cache --out runs/study.json \
        --grad proj=layer=blocks.-1.attn.proj --grad fc2=layer=blocks.-1.mlp.fc2 \
        --row embeddings --row proj:grads=proj --row fc2:grads=fc2 --memory-size 102400 --memory-size none \
        data.root=../shared/assets/camvid model.weights=dinov2_vits14_imgfocus.pth
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hummingbird_fungi.config.loader import load_config, parse_override
from hummingbird_fungi.config.schema import FungiOptions, parse_size
from hummingbird_fungi.eval.bootstrap import compare, resample_indices
from hummingbird_fungi.eval.study import (ImageStudy, davis_study, image_study, memory_rows, parse_composition,
                                          score_davis, score_images, tuned_comparisons)
from hummingbird_fungi.features.fungi_patch import FungiPatchFeatures
from hummingbird_fungi.fileio import write_json
from hummingbird_fungi.models.factory import create_encoder


def grad_options(text: str) -> tuple[str, dict[str, Any]]:
    """'fc2=layer=blocks.-1.mlp.fc2,objective=kl' -> ('fc2', checked FungiOptions as a dict)."""
    name, _, spec = text.partition("=")
    overrides = {keys[0]: value for keys, value in (parse_override(item) for item in spec.split(",") if item)}
    return name, FungiOptions.from_mapping(overrides).to_dict()


def main() -> None:
    """Extract, score every row at every k/T and memory size, print and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="segmentation preset name or file")
    parser.add_argument("--davis", type=Path, help="DAVIS-2016 folder (JPEGImages/, Annotations/)")
    parser.add_argument("--weights", type=Path, help="backbone weights (DAVIS; presets use model.weights)")
    parser.add_argument("--input-size", default="252x448", help="DAVIS network input HxW")
    parser.add_argument("--frame-step", type=int, default=3, help="DAVIS: score every N-th frame")
    parser.add_argument("--sequence", action="append", help="DAVIS sequences (default: all)")
    parser.add_argument("--grad", action="append", default=[], help="NAME=fungi options (repeatable)")
    parser.add_argument("--row", action="append", required=True, help="composition (repeatable)")
    parser.add_argument("--k", action="append", type=int, help="neighbours (first = the reference setting)")
    parser.add_argument("--temperature", action="append", type=float, help="softmax temperatures")
    parser.add_argument("--memory-size", action="append", help="rows of banks (memory.sampling); 'none' = every patch")
    parser.add_argument("--full-rows", help="comma-separated rows scored on the full bank (default: all)")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="preset overrides key=value")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (args.config is None) == (args.davis is None):
        parser.error("give exactly one of --config and --davis")
    grads = dict(grad_options(text) for text in args.grad)
    rows = [parse_composition(text) for text in args.row]
    if rows[0].name != "embeddings" or rows[0].grads:
        parser.error("the first --row must be 'embeddings' (the reference of every interval)")
    unknown = sorted({g for row in rows for g in row.grads} - set(grads))
    if unknown:
        parser.error(f"rows use gradients without a --grad: {unknown}")
    ks, temps = args.k or [30], args.temperature or [0.02]
    settings = [(k, t) for k in ks for t in temps]
    device = torch.device("cpu")
    config = load_config(args.config, args.overrides) if args.config else None
    encoder = (create_encoder("dinov2_vits14", weights=args.weights, device=device) if config is None else
               create_encoder(config.model.name, weights=config.model.weights, pretrained=config.model.pretrained,
                              device=device, seed=config.seed))
    extractors = {name: FungiPatchFeatures(encoder, FungiOptions.from_mapping(opts)) for name, opts in grads.items()}
    study = (davis_study(args.davis, encoder, extractors, args.cache, device, parse_size(args.input_size),
                         args.frame_step, args.sequence) if config is None else
             image_study(config, encoder, extractors, args.cache, device))
    images = isinstance(study, ImageStudy)
    reference = (ks[0], temps[0])
    report: dict[str, Any] = {"protocol": "images" if images else "davis", "grads": grads,
                              "input_size": list(study.input_size), "reference": {"k": ks[0], "temperature": temps[0]},
                              "tables": []}
    metric = "mIoU" if images else "mean J"
    if images:
        sizes = [None if s.lower() == "none" else int(s) for s in (args.memory_size or ["none"])]
        draws = resample_indices(len(study.targets), args.resamples, seed=0)
        full_rows = None if args.full_rows is None else set(args.full_rows.split(",")) | {"embeddings"}
        plans = [(size, [c for c in rows if size is not None or full_rows is None or c.name in full_rows])
                 for size in sizes]
    else:
        draws = resample_indices(len(study.sequences), args.resamples, seed=0)
        plans = [(None, rows)]
    for number, (size, comps) in enumerate(plans):
        if images:
            chosen, count = memory_rows(study, size)
            table: dict[str, Any] = {"memory_rows": count, "rows": []}
        else:
            count, table = None, {"sequences": list(study.sequences), "rows": []}
        report["tables"].append(table)
        scores: dict[tuple, np.ndarray] = {}  # (row, k, T) -> per-image matrices or per-sequence J
        for comp in comps:
            start = time.perf_counter()
            scored = (score_images(study, comp, chosen, settings) if images
                      else score_davis(study, comp, settings))
            for (k, t), values in scored.items():
                scores[(comp.name, k, t)] = values
                result = compare(scores[("embeddings", *reference)], values, draws)
                table["rows"].append({"row": comp.name, "k": k, "temperature": t, "score": result["b"],
                                      **{key: result[key] for key in ("difference", "low", "high", "excludes_zero")},
                                      "seconds": time.perf_counter() - start,
                                      **({"per_sequence": values.tolist()} if values.ndim == 1 else {})})
            write_json(args.out, report)
            print_rows(table, comp.name, count, metric)
        np.savez_compressed(args.out.with_suffix(f".table{number}.npz"),
                            **{f"{name}|{k}|{t}": values for (name, k, t), values in scores.items()})
        table["tuned"] = tuned_comparisons(table["rows"], scores, draws)
        write_json(args.out, report)
    print_summary(report, metric)


def line(row: dict) -> str:
    """Score, difference and interval of one result row."""
    return (f"{100 * row['score']:6.2f}  {100 * row['difference']:+6.2f} [{100 * row['low']:+6.2f}, "
            f"{100 * row['high']:+6.2f}]{' *' if row['excludes_zero'] else ''}")


def print_rows(table: dict, name: str, count: int | None, metric: str) -> None:
    """The lines of one row (every k and T) as they finish."""
    for row in table["rows"]:
        if row["row"] == name:
            where = "" if count is None else f"bank {count:7d} "
            print(f"{where}{name:24s} k {row['k']:3d} T {row['temperature']:.3f}  {metric} {line(row)}", flush=True)


def print_summary(report: dict, metric: str) -> None:
    """Per table: every row at the reference k/T, then each row's best k/T against the embeddings' best."""
    ref = report["reference"]
    for table in report["tables"]:
        title = f"memory rows {table['memory_rows']}" if "memory_rows" in table else "DAVIS first frame"
        print(f"\n== {title}: {metric} and its difference to the embeddings at k={ref['k']}, T={ref['temperature']}; "
              f"95% paired bootstrap interval (* excludes 0)")
        for row in table["rows"]:
            if row["k"] == ref["k"] and row["temperature"] == ref["temperature"]:
                print(f"  {row['row']:24s} {line(row)}")
        print("  each row at its best k/T against the embeddings at theirs (both picked on the scored set):")
        for row in table["tuned"]:
            print(f"  {row['row']:24s} k {row['k']:3d} T {row['temperature']:.3f}  {line(row)}")


if __name__ == "__main__":
    main()

"""Compare feature kinds (embeddings, FUNGI variants) at several memory sizes on one dataset.

Each variant's features are extracted once for every train patch (unbounded, no augmentation)
and once for the eval images; smaller banks are drawn from the full one with the builder's
own sampling (identical to building them directly). Prints and writes a JSON table.

    python tools/compare_features.py --config configs/camvid_dinov2_vits14.yaml \
        --variant embeddings --variant fungi:projection=structured --variant fungi:projection=dense \
        --memory-size none --memory-size 102400 --out runs/camvid_features.json \
        data.root=CAMVID model.weights=dinov2_vits14.pth
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hummingbird_fungi.config.loader import load_config
from hummingbird_fungi.data.segmentation import DatasetInfo, collate
from hummingbird_fungi.retrieval.transfer import predict_masks
from hummingbird_fungi.memory.bank import patches_per_image, subsample_bank, write_atomic
from hummingbird_fungi.eval.metrics import ConfusionMatrix
from hummingbird_fungi.eval.hbird import (build_memory, make_backbone, make_dataset, make_transfer, metric_summary,
                                        resolve_device, versions)


def variant_overrides(text: str) -> list[str]:
    """'fungi:projection=dense,negatives=none' -> config overrides."""
    kind, _, opts = text.partition(":")
    overrides = [f"features.kind={kind}"]
    overrides += [f"features.fungi.{item}" for item in opts.split(",") if item]
    return overrides


def eval_features(config: dict, extractor) -> tuple[list[torch.Tensor], list[torch.Tensor], float, DatasetInfo]:
    """Features (B, N, D) and target masks of every eval batch, seconds per image, and the dataset's info."""
    dataset = make_dataset(config, "eval", train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config["data"]["batch_size"],
                                         num_workers=config["data"]["num_workers"], collate_fn=collate)
    device = resolve_device(config["device"])
    feats, masks = [], []
    start = time.perf_counter()
    for batch in tqdm(loader, desc="eval features", unit="batch"):
        feats.append(extractor(batch["image"].to(device)).cpu())
        masks.append(batch["mask"])
    return feats, masks, (time.perf_counter() - start) / len(dataset), dataset.info


def score(config: dict, bank, feats, masks, info, grid) -> dict:
    """mIoU of the eval features against `bank`."""
    transfer = make_transfer(config, bank)
    cm = ConfusionMatrix(info.num_classes, ignore_index=info.ignore_index)
    for batch_feats, batch_masks in zip(feats, masks):
        preds = predict_masks(transfer, batch_feats, grid, [tuple(m.shape) for m in batch_masks],
                              config["transfer"]["class_chunk"])
        for pred, target in zip(preds, batch_masks):
            cm.update(pred, target)
    return metric_summary(cm, info.class_names, info.ignore_index)


def main() -> None:
    """Run every variant x memory size and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--memory-size", action="append", default=None, help="'none' = every patch")
    parser.add_argument("--sampling", action="append", default=None, help="label_aware (default) and/or uniform")
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sizes = [None if s.lower() == "none" else int(s) for s in (args.memory_size or ["none"])]
    base = load_config(args.config, args.overrides + ["memory.size=null", "memory.augment=false"])
    backbone = make_backbone(base, resolve_device(base["device"]))
    rules = args.sampling or ["label_aware"]
    report = {"rows": [], "config": base, "versions": versions()}
    rows = report["rows"]
    for variant in args.variant:
        config = load_config(args.config, args.overrides + ["memory.size=null", "memory.augment=false"]
                             + variant_overrides(variant))
        timings: dict[str, float] = {}
        full, extractor = build_memory(config, backbone=backbone, timings=timings)
        train_s = timings["build_memory_s"] / full.manifest["num_images"]
        feats, masks, eval_s, info = eval_features(config, extractor)
        grid = tuple(full.manifest["grid"])
        plans = [(size, rule) for size in sizes for rule in rules if size is not None or rule == rules[0]]
        per_image = full.manifest["patches_per_image"]
        for size, rule in plans:
            n_img = patches_per_image(size, full.manifest["num_images"], 1, per_image)
            bank = full if n_img == per_image else subsample_bank(full, n_img, rule)
            result = score(config, bank, feats, masks, info, grid)
            row = {"variant": variant, "memory_rows": bank.count, "sampling": rule if size else "all",
                   "miou": result["miou"],
                   "miou_reference": result["miou_reference"], "per_class_iou": result["per_class_iou"],
                   "train_s_per_img": train_s, "eval_s_per_img": eval_s, "features": extractor.manifest()}
            rows.append(row)
            print(f"{variant:40s} rows {bank.count:8d} {row['sampling']:12s} mIoU {100 * row['miou']:.2f}  "
                  f"(reference {100 * row['miou_reference']:.2f})", flush=True)
            if args.out:  # after every row, so a long run that is stopped keeps what it measured
                args.out.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(args.out, json.dumps(report, indent=2, default=str).encode() + b"\n")


if __name__ == "__main__":
    main()

"""Compare feature kinds (embeddings, FUNGI variants) at several memory sizes on one dataset.

Each variant's features are extracted once for every train patch (unbounded, no augmentation)
and once for the eval images; smaller banks are drawn from the full one with the builder's
own sampling (identical to building them directly). Prints and writes a JSON table.

    python tools/compare_features.py --config camvid_dinov2_vits14 \
        --variant embeddings --variant fungi:projection=structured --variant fungi:projection=dense \
        --memory-size none --memory-size 102400 --out runs/camvid_features.json \
        data.root=CAMVID model.weights=dinov2_vits14.pth
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hummingbird_fungi.config.loader import load_config
from hummingbird_fungi.config.schema import HbirdConfig
from hummingbird_fungi.data.segmentation import SegmentationDataset, collate
from hummingbird_fungi.data.transforms import EvalTransform
from hummingbird_fungi.eval.hbird import config_dataset
from hummingbird_fungi.eval.metrics import ConfusionMatrix, metric_summary
from hummingbird_fungi.features import PatchFeatures
from hummingbird_fungi.fileio import write_json
from hummingbird_fungi.memory.build import build_memory, subsample_bank
from hummingbird_fungi.memory.labels import patches_per_image
from hummingbird_fungi.models.factory import create_encoder
from hummingbird_fungi.retrieval.predict import QueryBatch, predict
from hummingbird_fungi.retrieval.transfer import LabelTransfer
from hummingbird_fungi.runtime import resolve_device, versions

# every variant fills an unbounded, unaugmented bank in RAM; smaller banks are drawn from it
FULL_BANK = ["memory.size=null", "memory.augment=false", "memory.path=null"]


def variant_overrides(text: str) -> list[str]:
    """'fungi:projection=dense,negatives=none' -> config overrides."""
    kind, _, opts = text.partition(":")
    overrides = [f"features.kind={kind}"]
    overrides += [f"features.fungi.{item}" for item in opts.split(",") if item]
    return overrides


def eval_features(config: HbirdConfig, extractor: PatchFeatures, dataset: SegmentationDataset,
                  input_size: tuple[int, int],
                  device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """Features (B, N, D) and target masks (at the input size) of every eval batch, and seconds per image."""
    dataset = dataset.with_transform(EvalTransform(input_size, normalize=config.data.normalize))
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.data.batch_size,
                                         num_workers=config.data.num_workers, collate_fn=collate)
    feats, masks = [], []
    start = time.perf_counter()
    for batch in tqdm(loader, desc="eval features", unit="batch"):
        feats.append(extractor(batch["image"].to(device)).cpu())
        masks.append(batch["mask"])
    return feats, masks, (time.perf_counter() - start) / len(dataset)


def score(config: HbirdConfig, bank, feats, masks, info, grid) -> dict:
    """mIoU of the eval features against `bank`."""
    transfer = LabelTransfer.from_options(bank, config.retrieval, config.transfer)
    cm = ConfusionMatrix(info.num_classes, ignore_index=info.ignore_index)
    batches = (QueryBatch(grid, [tuple(m.shape) for m in batch_masks], features=batch_feats, targets=list(batch_masks))
               for batch_feats, batch_masks in zip(feats, masks))
    for prediction in predict(batches, transfer, ignore_index=info.ignore_index,
                              class_chunk=config.transfer.class_chunk):
        cm.matrix += prediction.confusions[transfer.setting]
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
    overrides = args.overrides + FULL_BANK
    base = load_config(args.config, overrides)
    device = resolve_device(base.device)
    model = base.model
    encoder = create_encoder(model.name, weights=model.weights, pretrained=model.pretrained, device=device,
                             seed=base.seed)
    input_size = encoder.input_size(model.input_size)
    train, evaluation = config_dataset(base, "train"), config_dataset(base, "eval")
    rules = args.sampling or ["label_aware"]
    report = {"rows": [], "config": base.to_dict(), "versions": versions()}
    rows = report["rows"]
    for variant in args.variant:
        config = load_config(args.config, overrides + variant_overrides(variant))
        timings: dict[str, float] = {}
        full, extractor = build_memory(encoder, train, input_size=input_size, features=config.features,
                                       memory=config.memory, data=config.data, device=device, seed=config.seed,
                                       timings=timings)
        train_s = timings["build_memory_s"] / full.manifest["num_images"]
        feats, masks, eval_s = eval_features(config, extractor, evaluation, input_size, device)
        grid = tuple(full.manifest["grid"])
        plans = [(size, rule) for size in sizes for rule in rules if size is not None or rule == rules[0]]
        per_image = full.manifest["patches_per_image"]
        for size, rule in plans:
            n_img = patches_per_image(size, full.manifest["num_images"], 1, per_image)
            bank = full if n_img == per_image else subsample_bank(full, n_img, rule)
            result = score(config, bank, feats, masks, evaluation.info, grid)
            row = {"variant": variant, "memory_rows": bank.count, "sampling": rule if size else "all",
                   "miou": result["miou"],
                   "miou_reference": result["miou_reference"], "per_class_iou": result["per_class_iou"],
                   "train_s_per_img": train_s, "eval_s_per_img": eval_s, "features": extractor.manifest()}
            rows.append(row)
            print(f"{variant:40s} rows {bank.count:8d} {row['sampling']:12s} mIoU {100 * row['miou']:.2f}  "
                  f"(reference {100 * row['miou_reference']:.2f})", flush=True)
            if args.out:  # after every row, so a long run that is stopped keeps what it measured
                write_json(args.out, report)


if __name__ == "__main__":
    main()

"""Real run of the user path: 20 CamVid train images as examples, `hbfungi segment` on CamVid val.

Picks `--num-examples` train images evenly spaced over the sorted train list (CamVid is video,
so neighbours are near-duplicates), links them (no copies) into `<out>/examples/{images,masks}`,
segments CamVid val with the val ground truth as `hbfungi segment` does (segment.folders), then
rebuilds smaller banks from the same examples for the mIoU-vs-memory-size plot. Writes everything
`segment` writes plus `<out>/miou_vs_memory.png` and `<out>/camvid_report.json`.

    python tools/segment_camvid.py --root CAMVID_ROOT \
        --weights dinov2_vits14.pth --out /tmp/camvid_segment
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

from hummingbird_fungi.fileio import write_json
from hummingbird_fungi.segment.folders import list_images, segment_folder, segmenter_from_folder, sweep_and_plot
from hummingbird_fungi.segment.defaults import SEGMENT_DATA, SEGMENT_FEATURES, SEGMENT_KIND, SEGMENT_MEMORY

log = logging.getLogger("segment_camvid")


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="CamVid root (images/, annotations/, dataset.yaml)")
    parser.add_argument("--weights", type=Path, required=True, help="DINOv2 ViT-S/14 checkpoint")
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-examples", type=int, default=20)
    parser.add_argument("--features", default=SEGMENT_KIND, choices=("embeddings", "fungi"))
    parser.add_argument("--sweep", default="16,4", help="memory sizes for the plot, as divisors of the full bank")
    parser.add_argument("--batch-size", type=int, default=4)
    return parser.parse_args()


def link_examples(root: Path, out: Path, count: int) -> Path:
    """Symlink `count` evenly spaced train images, their masks and dataset.yaml into `<out>/examples`."""
    files = list_images(root / "images" / "train")[0]
    picked = [files[round(i * (len(files) - 1) / max(count - 1, 1))] for i in range(count)]
    examples = out / "examples"
    for sub in ("images", "masks"):
        (examples / sub).mkdir(parents=True, exist_ok=True)
    links = [(examples / "dataset.yaml", root / "dataset.yaml")]
    for image in picked:
        links += [(examples / "images" / image.name, image),
                  (examples / "masks" / f"{image.stem}.png", root / "annotations" / "train" / f"{image.stem}.png")]
    for link, target in links:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target.resolve())
    log.info("examples: %s", ", ".join(p.stem for p in picked))
    return examples


def main() -> None:
    """Segment CamVid val from a few train examples, sweep the memory size, report."""
    opts = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    examples = link_examples(opts.root, opts.out, opts.num_examples)
    val_images, val_masks = opts.root / "images" / "val", opts.root / "annotations" / "val"
    options = {"backbone": opts.backbone, "weights": opts.weights,
               "features": dataclasses.replace(SEGMENT_FEATURES, kind=opts.features),
               "data": dataclasses.replace(SEGMENT_DATA, batch_size=opts.batch_size)}
    segmenter, failed = segmenter_from_folder(examples, **options)
    summary = segment_folder(segmenter, val_images, opts.out, val_masks, opts.batch_size,
                             record={"examples": str(examples), "failed_examples": failed})
    summary["timings"]["total_s"] = time.perf_counter() - start
    write_json(opts.out / "summary.json", summary)
    segment_s = time.perf_counter() - start

    label = f"{opts.backbone} {opts.features}, {opts.num_examples} examples"
    points = sweep_and_plot(
        lambda size: segmenter_from_folder(examples, **{**options, "backbone": segmenter.backbone},
                                           memory=dataclasses.replace(SEGMENT_MEMORY, size=size))[0],
        summary, val_images, val_masks, [int(d) for d in opts.sweep.split(",") if d],
        opts.out / "miou_vs_memory.png", label, opts.batch_size, title="CamVid val: mIoU vs memory size")
    metrics = summary["metrics"]
    scored = sum("pixel_accuracy" in image for image in summary["segment"]["images"])
    report = {"miou": metrics["miou"], "miou_reference": metrics["miou_reference"],
              "per_class_iou": metrics["per_class_iou"], "num_val_images": scored,
              "num_examples": opts.num_examples, "memory_sweep": points, "segment_s": segment_s,
              "total_s": time.perf_counter() - start, "timings": summary["timings"],
              "images_per_s": summary["segment"]["images_per_s"]}
    write_json(opts.out / "camvid_report.json", report)
    print(f"CamVid val mIoU {100 * report['miou']:.2f} ({scored} images, {opts.num_examples} examples, "
          f"{summary['segmenter']['memory_rows']} memory rows); segment run {segment_s:.0f} s, "
          f"total {report['total_s']:.0f} s; grid {opts.out / 'grid.png'}")


if __name__ == "__main__":
    main()

"""Real run of the user path: 20 CamVid train images as examples, `hbfungi segment` on CamVid val.

Picks `--num-examples` train images evenly spaced over the sorted train list (CamVid is video,
so neighbours are near-duplicates), links them (no copies) into `<out>/examples/{images,masks}`,
runs the `segment` command with the val ground truth, then rebuilds smaller banks from the same
examples for the mIoU-vs-memory-size plot. Writes everything `segment` writes plus
`<out>/miou_vs_memory.png` and `<out>/camvid_report.json`.

    python tools/segment_camvid.py --root /work/shared/assets/camvid \
        --weights /work/shared/assets/weights/dinov2_vits14_imgfocus.pth --out /tmp/camvid_segment
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from hummingbird_fungi.cli.main import build_parser, write_results
from hummingbird_fungi.segment.folders import (build_segmenter, finish, list_images, masks_by_stem, memory_sweep,
                                           run_segment)
from hummingbird_fungi.segment.visualize import plot_miou_vs_memory

log = logging.getLogger("segment_camvid")


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="CamVid root (images/, annotations/, dataset.yaml)")
    parser.add_argument("--weights", type=Path, required=True, help="DINOv2 ViT-S/14 checkpoint")
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-examples", type=int, default=20)
    parser.add_argument("--features", default="embeddings", choices=("embeddings", "fungi"))
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
    args = build_parser().parse_args([
        "segment", "--examples", str(examples), "--images", str(val_images), "--ground-truth", str(val_masks),
        "--out", str(opts.out), "--backbone", opts.backbone, "--weights", str(opts.weights),
        "--features", opts.features, "--batch-size", str(opts.batch_size)])
    summary, segmenter = run_segment(args, examples, None, val_images, val_masks, opts.out)
    finish(summary, opts.out)
    segment_s = time.perf_counter() - start

    full = segmenter.bank.count
    gts = masks_by_stem(val_masks)
    files = [p for p in list_images(val_images)[0] if p.stem in gts]
    sizes = [full // int(d) for d in opts.sweep.split(",") if d]
    points = memory_sweep(lambda size: build_segmenter(args, examples, None, memory_size=size,
                                                       backbone=segmenter.backbone)[0],
                          files, [gts[p.stem] for p in files], sizes, opts.batch_size)
    points.append({"memory_size": None, "rows": full, "miou": summary["metrics"]["miou"]})
    plot_miou_vs_memory({f"{opts.backbone} {opts.features}, {opts.num_examples} examples":
                         [(p["rows"], p["miou"]) for p in points]}, opts.out / "miou_vs_memory.png",
                        title="CamVid val: mIoU vs memory size")
    report = {"miou": summary["metrics"]["miou"], "miou_reference": summary["metrics"]["miou_reference"],
              "per_class_iou": summary["metrics"]["per_class_iou"], "num_val_images": len(files),
              "num_examples": opts.num_examples, "memory_sweep": points, "segment_s": segment_s,
              "total_s": time.perf_counter() - start, "timings": summary["timings"],
              "images_per_s": summary["segment"]["images_per_s"]}
    write_results(report, opts.out / "camvid_report.json")
    print(f"CamVid val mIoU {100 * report['miou']:.2f} ({len(files)} images, {opts.num_examples} examples, "
          f"{full} memory rows); segment run {segment_s:.0f} s, total {report['total_s']:.0f} s; "
          f"grid {opts.out / 'grid.png'}")


if __name__ == "__main__":
    main()

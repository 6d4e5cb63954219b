"""mIoU of written masks against ground truth, read back from disk: what a user's `hbfungi segment` run gave.

Every `<stem>.png` of --masks (palette or single-channel class ids, as `segment` writes them) is scored against
--ground-truth/<stem>.png; a stem without ground truth, or ground truth without a mask, is an error naming
it. Prints the mIoU (classes present in ground truth or prediction, --ignore-index left out) and per-class IoU.

    python tools/score_masks.py --masks out/masks --ground-truth camvid/annotations/val \
        --num-classes 11 --ignore-index 11
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from hummingbird_fungi.data.transforms import read_mask
from hummingbird_fungi.errors import DataError
from hummingbird_fungi.eval.metrics import ConfusionMatrix, miou_standard


def score(masks: Path, ground_truth: Path, num_classes: int, ignore_index: int | None) -> dict:
    """{"images", "miou", "iou" (None: class absent)} of the masks against the ground truth, matched by stem."""
    written = {path.stem: path for path in masks.glob("*.png")}
    truth = {path.stem: path for path in ground_truth.glob("*.png")}
    if not written or written.keys() != truth.keys():
        missing = sorted(written.keys() ^ truth.keys())[:5]
        raise DataError(f"masks in {masks} and ground truth in {ground_truth} differ (e.g. {missing}), or are empty")
    matrix = ConfusionMatrix(num_classes, ignore_index)
    for stem in sorted(written):
        matrix.update(read_mask(written[stem]), read_mask(truth[stem]))
    miou, iou = miou_standard(matrix.matrix)
    return {"images": len(written), "miou": miou, "iou": [None if math.isnan(v) else v for v in iou]}


def main() -> None:
    """Score and print."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--masks", type=Path, required=True)
    parser.add_argument("--ground-truth", type=Path, required=True)
    parser.add_argument("--num-classes", type=int, required=True)
    parser.add_argument("--ignore-index", type=int, default=None)
    args = parser.parse_args()
    result = score(args.masks, args.ground_truth, args.num_classes, args.ignore_index)
    print(json.dumps(result))
    print(f"mIoU {100 * result['miou']:.2f} over {result['images']} images from {args.masks}")


if __name__ == "__main__":
    main()

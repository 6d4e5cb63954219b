"""Cut object classification crops from a CamVid-style folder dataset into an ImageFolder tree.

Input layout (`--root`): images/{train,val}/<stem>.jpg, annotations/{train,val}/<stem>.png
(single-channel class ids, 11 = void) and dataset.yaml with the class names.

Rule, per split and image:
1. for each object class (default: pole, sign_symbol, fence, car, pedestrian, bicyclist), take
   the 8-connected components of that class's pixels;
2. keep components of at least `--min-area` pixels;
3. the crop is the component's bounding box grown to a square of side
   max(h, w) * (1 + 2 * margin), at least `--min-side` px, centred on the box, shifted to lie
   inside the image (clipped when larger than the image);
4. per split and class keep at most `--max-per-class` crops, a seeded random choice among all
   kept components (all of them when fewer).
Crops are written as <out>/<split>/<class>/<stem>_<component>.png, with a rule.json.

    python tools/make_camvid_crops.py --root CAMVID_ROOT --out runs/camvid_crops
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from hummingbird_fungi.data.segmentation import read_folder_info
from hummingbird_fungi.data.transforms import read_image, read_mask
from hummingbird_fungi.fileio import write_json

log = logging.getLogger("make_camvid_crops")

OBJECT_CLASSES = ("pole", "sign_symbol", "fence", "car", "pedestrian", "bicyclist")


@dataclass(frozen=True)
class CropRule:
    """Parameters of the crop rule (saved next to the crops)."""

    classes: tuple[str, ...] = OBJECT_CLASSES
    min_area: int = 200
    margin: float = 0.25
    min_side: int = 32
    max_per_class: int | None = 100
    seed: int = 0


@dataclass(frozen=True)
class Crop:
    """One object crop: source image, class and square box (left, top, right, bottom)."""

    stem: str
    label: str
    component: int
    box: tuple[int, int, int, int]
    area: int


def square_box(rows: slice, cols: slice, shape: tuple[int, int], rule: CropRule) -> tuple[int, int, int, int]:
    """The component's bounding box grown to a square with margin, inside the image."""
    height, width = shape
    side = max(rows.stop - rows.start, cols.stop - cols.start) * (1 + 2 * rule.margin)
    side = int(round(min(max(side, rule.min_side), height, width)))
    centre_y, centre_x = (rows.start + rows.stop) / 2, (cols.start + cols.stop) / 2
    top = int(round(min(max(centre_y - side / 2, 0), height - side)))
    left = int(round(min(max(centre_x - side / 2, 0), width - side)))
    return left, top, left + side, top + side


def find_crops(mask: np.ndarray, stem: str, class_ids: dict[str, int], rule: CropRule) -> list[Crop]:
    """All crops of one label map (H, W) under the rule (steps 1-3)."""
    crops = []
    for label in rule.classes:
        components, count = ndimage.label(mask == class_ids[label], structure=np.ones((3, 3)))
        if count == 0:
            continue
        areas = np.bincount(components.ravel())[1:]  # (count,)
        for number, bounds in enumerate(ndimage.find_objects(components), start=1):
            if areas[number - 1] >= rule.min_area:
                box = square_box(bounds[0], bounds[1], mask.shape, rule)
                crops.append(Crop(stem, label, number, box, int(areas[number - 1])))
    return crops


def limit_per_class(crops: list[Crop], rule: CropRule) -> list[Crop]:
    """At most max_per_class crops per class, a seeded random choice (step 4)."""
    if rule.max_per_class is None:
        return crops
    rng = np.random.default_rng(rule.seed)
    kept = []
    for label in rule.classes:
        members = [c for c in crops if c.label == label]
        if len(members) > rule.max_per_class:
            chosen = np.sort(rng.choice(len(members), rule.max_per_class, replace=False))
            members = [members[i] for i in chosen]
        kept.extend(members)
    return kept


def make_split(root: Path, out: Path, split: str, class_ids: dict[str, int], rule: CropRule) -> dict[str, int]:
    """Write one split's crops -> number of crops per class."""
    labels = sorted((root / "annotations" / split).glob("*.png"))
    if not labels:
        raise SystemExit(f"no label maps in {root / 'annotations' / split}")
    crops = []
    for path in tqdm(labels, desc=f"{split}: components", unit="img"):
        crops.extend(find_crops(read_mask(path), path.stem, class_ids, rule))
    crops = limit_per_class(crops, rule)
    for crop in tqdm(crops, desc=f"{split}: crops", unit="crop"):
        folder = out / split / crop.label
        folder.mkdir(parents=True, exist_ok=True)
        read_image(root / "images" / split / f"{crop.stem}.jpg").crop(crop.box).save(
            folder / f"{crop.stem}_{crop.component:03d}.png")
    return {label: sum(c.label == label for c in crops) for label in rule.classes}


def main() -> None:
    """Parse arguments and write the crops of every split."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="CamVid folder (images/, annotations/, dataset.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="output ImageFolder root")
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    parser.add_argument("--classes", nargs="+", default=list(OBJECT_CLASSES))
    parser.add_argument("--min-area", type=int, default=CropRule.min_area)
    parser.add_argument("--margin", type=float, default=CropRule.margin)
    parser.add_argument("--min-side", type=int, default=CropRule.min_side)
    parser.add_argument("--max-per-class", type=int, default=CropRule.max_per_class, help="0 keeps all")
    parser.add_argument("--seed", type=int, default=CropRule.seed)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = list(read_folder_info(args.root / "dataset.yaml").class_names)
    unknown = sorted(set(args.classes) - set(names))
    if unknown:
        raise SystemExit(f"classes {unknown} are not in {args.root / 'dataset.yaml'} ({names})")
    rule = CropRule(tuple(args.classes), args.min_area, args.margin, args.min_side, args.max_per_class or None,
                    args.seed)
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty; choose a new folder")
    counts = {split: make_split(args.root, args.out, split, {n: i for i, n in enumerate(names)}, rule)
              for split in args.splits}
    write_json(args.out / "rule.json", {"root": str(args.root.resolve()), "rule": asdict(rule), "counts": counts})
    for split, per_class in counts.items():
        log.info("%s: %d crops %s", split, sum(per_class.values()), per_class)


if __name__ == "__main__":
    main()

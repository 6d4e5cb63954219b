"""COCO-Stuff and COCO-Things: the coarse label spaces of dense self-supervised evaluation, and the 171 classes.

Class names and the category -> class mapping are always derived from the categories of the
official JSON files, never from a table kept here:

* `coco_stuff`: the stuff supercategories (15), sorted by name; COCO-Stuff's "other" and thing pixels are void;
* `coco_things`: the thing supercategories (12), sorted by name; stuff pixels are void;
* `coco_stuff171`: the 80 thing and 91 stuff categories, in category-id order; "other" is void.

Void is 255. Labels come from pixel maps when the root has them, else they are rendered from the JSON
annotations (docs/protocol.md lists the accepted layouts and the order in which sources are tried).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from hummingbird_fungi.data.archives import DataPath
from hummingbird_fungi.data.segmentation import (
    SEGMENTATION_DATASETS,
    DatasetInfo,
    MaskSource,
    SegmentationDataset,
    existing_dir,
    images_by_stem,
    pair_by_stem,
    restrict_ids,
)
from hummingbird_fungi.errors import DataError

log = logging.getLogger(__name__)

IGNORE = 255
OTHER = "other"  # COCO-Stuff's catch-all supercategory (category 183, the pixels of things): never a class
VARIANTS = {"coco_stuff": "stuff", "coco_things": "things", "coco_stuff171": "all"}
PIXEL_MAPS = "stuffthingmaps_trainval2017"  # COCO-Stuff's stuff+thing maps: pixel = category id - 1, 255 unlabelled


@dataclass(frozen=True)
class Category:
    """One entry of a JSON file's `categories`."""

    id: int
    name: str
    supercategory: str
    isthing: bool


Labelled = tuple[list[tuple[DataPath, MaskSource]], list[Category]]  # samples and the categories of their JSON


def read_json(path: DataPath) -> dict[str, Any]:
    """A COCO annotation file as a dict (DataError naming it when it cannot be read)."""
    log.info("reading %s", path)
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read COCO annotations {path}: {err}") from err


def categories_of(data: dict[str, Any], kind: str, path: DataPath) -> list[Category]:
    """The categories of an `instances` (things), `stuff` or `panoptic` (per-category isthing) JSON."""
    try:
        return [Category(int(c["id"]), str(c["name"]), str(c["supercategory"]),
                         bool(c["isthing"]) if kind == "panoptic" else kind == "instances")
                for c in data["categories"]]
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: categories need id, name and supercategory (panoptic: isthing): {err}") from err


def label_space(categories: Iterable[Category], variant: str) -> tuple[tuple[str, ...], np.ndarray]:
    """(class names, int64 lookup from category id to class, void 255) of variant 'stuff', 'things' or 'all'."""
    categories = list(categories)
    things = [c for c in categories if c.isthing]
    stuff = [c for c in categories if not c.isthing and c.supercategory != OTHER]
    if variant == "all":
        members = sorted(things + stuff, key=lambda c: c.id)
        names = tuple(c.name for c in members)
        classes = {c.id: i for i, c in enumerate(members)}
    else:
        members = things if variant == "things" else stuff
        names = tuple(sorted({c.supercategory for c in members}))
        classes = {c.id: names.index(c.supercategory) for c in members}
    if not members:
        raise DataError(f"the COCO categories hold no {variant} categories")
    table = np.full(max(256, max(classes) + 1), IGNORE, dtype=np.int64)
    table[list(classes)] = list(classes.values())
    return names, table


class RenderedMask(MaskSource):
    """Category ids of one image drawn from its COCO annotations with pycocotools (0 = unlabelled).

    Annotations are drawn in the given order, later ones over earlier ones.
    """

    def __init__(self, name: str, height: int, width: int, annotations: tuple[tuple[int, Any], ...]) -> None:
        self.name, self.height, self.width, self.annotations = name, height, width, annotations

    def read(self) -> np.ndarray:
        from pycocotools import mask as mask_utils

        ids = np.zeros((self.height, self.width), dtype=np.int64)
        for category, segmentation in self.annotations:
            if isinstance(segmentation, list):  # polygons, as pycocotools' annToRLE
                rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, self.height, self.width))
            elif isinstance(segmentation["counts"], list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(segmentation, self.height, self.width)
            else:
                rle = segmentation
            ids[mask_utils.decode(rle).astype(bool)] = category
        return ids

    def __str__(self) -> str:
        return f"<annotations of {self.name}>"


class PanopticMask(MaskSource):
    """Category ids of a panoptic PNG (segment id = R + 256 G + 256^2 B) and its segments (0 = unlabelled)."""

    def __init__(self, png: DataPath, segments: tuple[tuple[int, int], ...]) -> None:
        self.png, self.segments = png, segments

    def read(self) -> np.ndarray:
        try:
            with self.png.open("rb") as stream, Image.open(stream) as image:
                rgb = np.asarray(image.convert("RGB"), dtype=np.int64)  # (h, w, 3)
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read panoptic segmentation {self.png}: {err}") from err
        segment = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        ids = np.zeros(segment.shape, dtype=np.int64)
        for segment_id, category in self.segments:
            ids[segment == segment_id] = category
        return ids

    def __str__(self) -> str:
        return str(self.png)


def _find(root: DataPath, name: str) -> DataPath | None:
    """`<root>/<name>`, `<root>/annotations/<name>` or `<root>/annotations/*/<name>`, the first that exists."""
    annotations = root / "annotations"
    candidates = [root / name, annotations / name]
    if annotations.is_dir():
        candidates += [folder / name for folder in annotations.iterdir() if folder.is_dir()]
    return next((path for path in candidates if path.exists()), None)


def _category_file(root: DataPath, kind: str, split: str) -> DataPath | None:
    """A JSON file of `kind` for the categories only: the small val2017 file first, then the split's."""
    return next(filter(None, (_find(root, f"{kind}_{s}.json") for s in ("val2017", split, "train2017"))), None)


def _categories(root: DataPath, groups: tuple[tuple[str, ...], ...], split: str, variant: str) -> list[Category]:
    """The categories of one JSON file per group of alternative kinds (the first kind that has a file)."""
    categories = []
    for group in groups:
        found = next(((kind, path) for kind in group if (path := _category_file(root, kind, split))), None)
        if found is None:
            raise DataError(f"COCO root {root}: the {variant} labels need the categories of "
                            f"{' or '.join(f'{kind}_<split>.json' for kind in group)} in {root}/annotations/")
        kind, path = found
        categories += categories_of(read_json(path), kind, path)
    return categories


def _image_folder(root: DataPath, split: str) -> DataPath:
    """`<root>/images/<split>` or `<root>/<split>`."""
    for folder in (root / "images" / split, root / split):
        if folder.is_dir():
            return folder
    raise DataError(f"COCO root {root} has no image folder {root}/images/{split} or {root}/{split}")


def _listed_images(entries: dict[str, Any], images: DataPath, file_set: str | Path | None,
                   path: DataPath) -> list[tuple[DataPath, Any]]:
    """(image file, entry) for the JSON entries by image stem, sorted and restricted to `file_set`."""
    files = images_by_stem(images)
    listed = []
    for stem in restrict_ids(sorted(entries), file_set, f"the images of {path}"):
        if stem not in files:
            raise DataError(f"{path} lists image {stem}, which is not in {images}")
        listed.append((files[stem], entries[stem]))
    return listed


def _rendered(root: DataPath, images: DataPath, split: str, variant: str,
              file_set: str | Path | None) -> Labelled | None:
    """Samples rendered from instances/stuff JSON of the split with pycocotools, or None without those files."""
    kinds = {"things": ("instances",), "stuff": ("stuff",), "all": ("stuff", "instances")}[variant]
    paths = [_find(root, f"{kind}_{split}.json") for kind in kinds]
    if None in paths:
        return None
    try:
        import pycocotools.mask  # noqa: F401  (checked here, used by RenderedMask in the loader's processes)
    except ImportError as err:
        raise DataError("rendering COCO masks from JSON annotations needs pycocotools: "
                        "pip install 'hummingbird-fungi[coco]'") from err
    annotations: dict[int, list[tuple[int, Any]]] = {}
    categories: list[Category] = []
    for kind, path in zip(kinds, paths):
        data = read_json(path)
        categories += categories_of(data, kind, path)
        ordered = sorted(data.get("annotations", []), key=lambda a: -a.get("iscrowd", 0))  # crowd regions first
        for annotation in ordered:
            annotations.setdefault(annotation["image_id"], []).append(
                (int(annotation["category_id"]), annotation["segmentation"]))
    entries = {Path(image["file_name"]).stem: image for image in data["images"]}  # the last file's image list
    samples = [(file, RenderedMask(entry["file_name"], int(entry["height"]), int(entry["width"]),
                                   tuple(annotations.get(entry["id"], ()))))
               for file, entry in _listed_images(entries, images, file_set, paths[-1])]
    return samples, categories


def _panoptic(root: DataPath, images: DataPath, split: str,
              file_set: str | Path | None) -> Labelled | None:
    """Samples of panoptic_<split>.json with its PNG folder panoptic_<split>/, or None without them."""
    path, pngs = _find(root, f"panoptic_{split}.json"), _find(root, f"panoptic_{split}")
    if path is None or pngs is None:
        return None
    data = read_json(path)
    entries = {Path(entry["file_name"]).stem: entry for entry in data["annotations"]}
    samples = [(file, PanopticMask(pngs / entry["file_name"],
                                   tuple((int(s["id"]), int(s["category_id"])) for s in entry["segments_info"])))
               for file, entry in _listed_images(entries, images, file_set, path)]
    return samples, categories_of(data, "panoptic", path)


def coco_dataset(root: str | Path, split: str, file_set: str | Path | None = None, *, kind: str,
                 **kw: Any) -> SegmentationDataset:
    """COCO of dataset `kind` (coco_stuff, coco_things, coco_stuff171), split train|val (or train2017|val2017)."""
    variant = VARIANTS[kind]
    root = existing_dir(root, "COCO root")
    split = split if split[-4:].isdigit() else f"{split}2017"
    images = _image_folder(root, split)
    pixel_maps, stuff_maps = _find(root, f"{PIXEL_MAPS}/{split}"), _find(root, f"stuff_{split}_pixelmaps")
    if pixel_maps is not None:
        source, samples = str(pixel_maps), pair_by_stem(images, pixel_maps, file_set)
        things = ("instances", "panoptic")  # the same thing categories
        groups = {"things": (things,), "stuff": (("stuff",),), "all": (things, ("stuff",))}[variant]
        names, table = label_space(_categories(root, groups, split, variant), variant)
        label_map = np.full(256, IGNORE, dtype=np.int64)
        label_map[:255] = table[1:256]  # pixel value v holds category v + 1; 255 stays void
    elif variant == "stuff" and stuff_maps is not None:
        source, samples = str(stuff_maps), pair_by_stem(images, stuff_maps, file_set)
        names, label_map = label_space(_categories(root, (("stuff",),), split, variant), variant)
    else:
        found = _rendered(root, images, split, variant, file_set)
        if found is None and variant != "all":
            found = _panoptic(root, images, split, file_set)
        if found is None:
            raise DataError(f"COCO root {root} has no labels for {split}: expected {PIXEL_MAPS}/{split}/, "
                            f"annotations/stuff_{split}_pixelmaps/ (stuff), or annotations/ with "
                            f"instances_{split}.json (things), stuff_{split}.json (stuff), both (171 classes), "
                            f"or panoptic_{split}.json with panoptic_{split}/ (stuff or things)")
        samples, categories = found
        source = "JSON annotations"
        names, label_map = label_space(categories, variant)
    log.info("%s %s: %d images from %s, labels from %s (%d classes)", kind, split, len(samples), root, source,
             len(names))
    return SegmentationDataset(samples, DatasetInfo(kind, len(names), IGNORE, names, False),
                               source=f"COCO root {root} split {split!r}", label_map=label_map, **kw)


for _kind in VARIANTS:
    SEGMENTATION_DATASETS.register(_kind)(functools.partial(coco_dataset, kind=_kind))

"""Segmentation datasets (Pascal VOC, ADE20K, generic folders): file discovery, validation and loading.

Also the parts every layout shares: the label space (`DatasetInfo`), `SegmentationDataset` (samples
of an image and a label file or a computed `MaskSource`, raw ids mapped through an optional lookup
table), file sets, and the registry of dataset kinds (COCO and Cityscapes register theirs from
their own modules). Roots may be folders or tar archives (`data.archives`).
"""

from __future__ import annotations

import copy
import logging
import numbers
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
import yaml
from PIL import Image

from hummingbird_fungi.errors import DataError
from hummingbird_fungi.data.archives import DataPath, as_path
from hummingbird_fungi.data.subsets import random_subset
from hummingbird_fungi.registry import Registry
from hummingbird_fungi.runtime import generator
from hummingbird_fungi.data.transforms import TrainTransform, read_image, read_mask

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_ID_EXTENSIONS = IMAGE_EXTENSIONS + (".mat",)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
ADE20K_CLASSES = (
    "other",
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)
_ADE20K_SPLITS = {"train": "training", "val": "validation"}

Colour = tuple[int, int, int]


def palette_problem(palette: Any, num_classes: int) -> str | None:
    """What is wrong with a palette (one [r, g, b] of integers in 0..255 per class), or None."""
    if not isinstance(palette, (list, tuple)) or len(palette) != num_classes:
        return f"must list one [r, g, b] colour for each of the {num_classes} classes"
    for i, colour in enumerate(palette):
        if not isinstance(colour, (list, tuple, np.ndarray)) or len(colour) != 3 or any(
                isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v <= 255 for v in colour):
            return f"entry {i} ({colour!r}) is not [r, g, b] with integers in 0..255"
    return None


@dataclass(frozen=True)
class DatasetInfo:
    """Label space of a dataset, with an optional colour per class for masks and overlays."""

    name: str
    num_classes: int
    ignore_index: int | None
    class_names: tuple[str, ...]
    void_to_background: bool  # True for VOC: the reference maps void 255 -> background 0 in memory labels
    palette: tuple[Colour, ...] | None = None

    def __post_init__(self) -> None:
        if self.palette is not None:
            problem = palette_problem(self.palette, self.num_classes)
            if problem:
                raise DataError(f"palette of dataset {self.name}: {problem}")
            object.__setattr__(self, "palette", tuple(tuple(int(v) for v in colour) for colour in self.palette))


VOC_INFO = DatasetInfo("voc", 21, 255, VOC_CLASSES, True)
ADE20K_INFO = DatasetInfo("ade20k", 151, 0, ADE20K_CLASSES, False)


def check_labels(mask: np.ndarray, info: DatasetInfo, path: Any) -> None:
    """Raise DataError naming `path` if `mask` holds ids outside [0, C), the ignore index and VOC's 255."""
    if mask.size == 0 or (mask.min() >= 0 and mask.max() < info.num_classes):
        return
    allowed = {info.ignore_index, 255 if info.void_to_background else None} - {None}
    bad = [int(v) for v in np.unique(mask) if not 0 <= v < info.num_classes and int(v) not in allowed]
    if bad:
        raise DataError(f"mask {path} has label values {bad[:10]} outside [0, {info.num_classes}) "
                        f"(ignore index {info.ignore_index}) for dataset {info.name}")


class MaskSource(ABC):
    """A mask computed rather than read from one label file (e.g. rendered from annotations); `str` names it."""

    @abstractmethod
    def read(self) -> np.ndarray:
        """(h, w) int64 raw ids."""


# (image: a path, or an adapter's reference to an item; mask: a path, a MaskSource or None when unlabelled)
Sample = tuple[Any, Any]


def _reference(value: Any) -> Any:
    """A sample entry as stored: paths (and 'x.tar!/...' strings) as Path or TarPath, other references unchanged."""
    return as_path(value) if isinstance(value, (str, os.PathLike)) else value


class SegmentationDataset(torch.utils.data.Dataset):
    """(image, mask) pairs with validation, a paired transform and per-(seed, epoch, index) augmentation.

    `label_map` (optional, int64 of length L) maps the raw ids read from a mask to class ids (raw ids
    outside [0, L) are errors); `id_suffix` is cut from image stems to give the sample ids of file
    sets and subsets.
    """

    def __init__(self, samples: list[tuple[Any, Any]], info: DatasetInfo, transform: Callable | None = None,
                 seed: int = 0, keep_original_mask: bool = False, source: str = "the given sample list",
                 label_map: np.ndarray | None = None, id_suffix: str = ""):
        if not samples:
            raise DataError(f"no images found in {source}")
        self.samples: list[Sample] = [(_reference(image), None if mask is None else _reference(mask))
                                      for image, mask in samples]
        self.info = info
        self.transform = transform
        self.seed = seed
        self.keep_original_mask = keep_original_mask
        self.label_map = label_map
        self.id_suffix = id_suffix
        self.epoch = 0

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.samples)

    def with_transform(self, transform: Callable | None, keep_original_mask: bool = False,
                       seed: int | None = None) -> "SegmentationDataset":
        """A shallow copy serving the same samples through `transform` (and augmentation `seed`, if given)."""
        out = copy.copy(self)
        out.transform, out.keep_original_mask, out.epoch = transform, keep_original_mask, 0
        out.seed = self.seed if seed is None else seed
        return out

    @property
    def ids(self) -> list[str]:
        """Sample ids (as in file sets): image file stems without `id_suffix`, or the references' names."""
        return [getattr(image, "stem", str(image)).removesuffix(self.id_suffix) for image, _ in self.samples]

    def subset(self, size: int | float | None, seed: int) -> "SegmentationDataset":
        """A shallow copy keeping the seeded subset of `size` (a count or a fraction, see data.subsets), in order."""
        if size is None:
            return self
        keep = random_subset(self.ids, size, seed)
        log.info("%s: a seeded subset of %d of %d images (size %s, seed %d)", self.info.name, len(keep), len(self),
                 size, seed)
        if len(keep) == len(self):
            return self
        out = copy.copy(self)
        out.samples = [self.samples[i] for i in keep]
        return out

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation epoch (train transforms draw from (seed, epoch, index))."""
        self.epoch = epoch

    def read_labels(self, mask: DataPath | MaskSource) -> np.ndarray:
        """(h, w) int64 ids of a label file or a MaskSource, mapped through `label_map` when there is one."""
        return self.map_labels(mask.read() if isinstance(mask, MaskSource) else read_mask(mask), mask)

    def map_labels(self, raw: np.ndarray, name: Any) -> np.ndarray:
        """`raw` ids through `label_map` (unchanged without one); DataError naming `name` for ids it does not map."""
        if self.label_map is None:
            return raw
        if raw.size and (raw.min() < 0 or raw.max() >= len(self.label_map)):
            bad = [int(v) for v in np.unique(raw) if not 0 <= v < len(self.label_map)]
            raise DataError(f"mask {name} has raw ids {bad[:10]} that dataset {self.info.name} does not map "
                            f"(expected 0..{len(self.label_map) - 1})")
        return self.label_map[raw]

    def read_sample(self, index: int) -> tuple[Image.Image, np.ndarray | None]:
        """The RGB image and (h, w) int64 class ids of sample `index`, unchecked (None for an unlabelled sample)."""
        image_path, mask_path = self.samples[index]
        return read_image(image_path), None if mask_path is None else self.read_labels(mask_path)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray | None]:
        """The RGB image and its validated (h, w) int64 class-id mask (None for an unlabelled sample)."""
        image_path, mask_path = self.samples[index]
        image, mask = self.read_sample(index)
        if mask is None:
            return image, None
        if mask.shape != (image.height, image.width):
            raise DataError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                            f"{image.width}x{image.height} (width x height)")
        check_labels(mask, self.info, mask_path)
        return image, mask

    def _transform(self, index: int, image: Image.Image, mask: np.ndarray | None) -> tuple[torch.Tensor, Any]:
        """Apply the transform; train transforms get a generator seeded from (seed, epoch, index)."""
        if isinstance(self.transform, TrainTransform):
            if mask is None:
                raise DataError(f"image {self.samples[index][0]} has no mask; the train transform needs one")
            rng = generator(self.seed, self.epoch, index)
            return self.transform(image, mask, rng)
        if self.transform is not None:
            return self.transform(image, mask)
        tensor = TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)  # (3, h, w) in [0, 1]
        return tensor, None if mask is None else torch.from_numpy(mask)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """{"image": (3,H,W) float32, "mask": (H,W) int64, "index", "path"[, "original_mask": (h,w) int64]}."""
        image, mask = self.load(index)
        item: dict[str, Any] = {"index": index, "path": str(self.samples[index][0])}
        item["image"], resized = self._transform(index, image, mask)
        if resized is not None:
            item["mask"] = resized
        if self.keep_original_mask and mask is not None:
            item["original_mask"] = torch.from_numpy(mask)
        return item


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images, masks and indices; keep paths and original masks (sizes differ) as lists."""
    out: dict[str, Any] = {key: torch.stack([item[key] for item in batch]) for key in ("image", "mask")
                           if key in batch[0]}  # (B, 3, H, W), (B, H, W)
    out["index"] = torch.tensor([item["index"] for item in batch])
    out["path"] = [item["path"] for item in batch]
    if "original_mask" in batch[0]:
        out["original_mask"] = [item["original_mask"] for item in batch]
    return out


def _strip_extension(name: str) -> str:
    """Drop a known image/label extension from an id."""
    return name[:-len(Path(name).suffix)] if Path(name).suffix.lower() in _ID_EXTENSIONS else name


def read_file_set(path: str | os.PathLike | DataPath) -> list[str]:
    """Ids of an id-list file (one per line, blanks skipped, extensions stripped), in file order."""
    path = as_path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise DataError(f"cannot read id list {path}: {err}") from err
    ids = [_strip_extension(line.strip()) for line in text.splitlines() if line.strip()]
    if not ids:
        raise DataError(f"id list {path} is empty")
    return ids


def restrict_ids(ids: list[str], file_set: str | Path | None, split_name: str) -> list[str]:
    """`ids` restricted to those of `file_set` (sorted); DataError if the file set names ids outside the split."""
    if file_set is None:
        return ids
    wanted = sorted(set(read_file_set(file_set)))
    known = set(ids)
    missing = [i for i in wanted if i not in known]
    if missing:
        raise DataError(f"{len(missing)} ids of file set {file_set} are not in {split_name}, e.g. {missing[:5]}")
    return wanted


def existing_dir(path: str | os.PathLike | DataPath, what: str) -> DataPath:
    """`path` as a Path (a TarPath inside an archive), or DataError naming it if it is not a directory."""
    path = as_path(path)
    if not path.is_dir():
        raise DataError(f"{what} {path} does not exist or is not a directory")
    return path


def _existing_file(path: DataPath, what: str) -> DataPath:
    """`path`, or DataError naming it if it is not a file."""
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    return path


def _voc_layout_a(root: DataPath, split: str, file_set: str | Path | None) -> list[Sample]:
    """Samples of `<root>/{images,SegmentationClass,SegmentationClassAug,sets}` (val masks from SegmentationClass)."""
    ids = restrict_ids(sorted(read_file_set(root / "sets" / f"{split}.txt")), file_set, f"VOC split {split!r}")
    mask_dir = existing_dir(root / ("SegmentationClass" if split == "val" else "SegmentationClassAug"),
                            "VOC mask folder")
    return [(_existing_file(root / "images" / f"{i}.jpg", "VOC image"),
             _existing_file(mask_dir / f"{i}.png", f"mask of VOC image {i}")) for i in ids]


def _find_voc2012(root: DataPath) -> DataPath:
    """The VOC2012 folder (holding JPEGImages) of an official-layout root."""
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DataError(f"{root} is not a VOC root: expected {root}/images and {root}/sets, or "
                    f"{root}/VOCdevkit/VOC2012/JPEGImages (official layout)")


def _find_sbd(root: DataPath, voc: DataPath) -> dict[str, DataPath] | None:
    """id -> SBD mask (SegmentationClassAug png or benchmark_RELEASE .mat), or None without SBD."""
    for aug in (root / "SegmentationClassAug", voc / "SegmentationClassAug"):
        if aug.is_dir():
            return {p.stem: p for p in aug.glob("*.png")}
    bench = root / "benchmark_RELEASE" / "dataset"
    if bench.is_dir():
        ids = read_file_set(bench / "train.txt") + read_file_set(bench / "val.txt")
        return {i: bench / "cls" / f"{i}.mat" for i in ids}
    return None


def _voc_split_ids(root: DataPath, voc: DataPath, split: str, sbd: dict[str, DataPath] | None) -> list[str]:
    """Sorted ids of an official-layout split; trainaug = (SBD train+val + VOC train) - VOC val."""
    lists = voc / "ImageSets" / "Segmentation"
    if split != "trainaug":
        return sorted(read_file_set(lists / f"{split}.txt"))
    if sbd is None:
        raise DataError(f"VOC split 'trainaug' needs SBD masks in {root}/SegmentationClassAug/ or "
                        f"{root}/benchmark_RELEASE/dataset/ (none found)")
    train, val = read_file_set(lists / "train.txt"), read_file_set(lists / "val.txt")
    return sorted((set(sbd) | set(train)) - set(val))


def _voc_layout_b(root: DataPath, split: str, file_set: str | Path | None) -> list[Sample]:
    """Samples of the official VOCdevkit layout; val masks from SegmentationClass, others from SBD when it has them."""
    voc = _find_voc2012(root)
    sbd = _find_sbd(root, voc)
    ids = restrict_ids(_voc_split_ids(root, voc, split, sbd), file_set, f"VOC split {split!r}")
    sbd_masks = {} if split == "val" or sbd is None else sbd
    return [(_existing_file(voc / "JPEGImages" / f"{i}.jpg", "VOC image"),
             _existing_file(sbd_masks.get(i, voc / "SegmentationClass" / f"{i}.png"), f"mask of VOC image {i}"))
            for i in ids]


def voc_dataset(root: str | Path, split: str, file_set: str | Path | None = None, **kw: Any) -> SegmentationDataset:
    """Pascal VOC 2012 (21 classes, void 255) in the flat layout (docs/protocol.md#datasets) or the official
    VOCdevkit layout."""
    root = existing_dir(root, "VOC root")
    layout_a = (root / "images").is_dir()
    samples = _voc_layout_a(root, split, file_set) if layout_a else _voc_layout_b(root, split, file_set)
    log.info("VOC %s (%s layout): %d images from %s", split, "flat" if layout_a else "official", len(samples), root)
    return SegmentationDataset(samples, VOC_INFO, source=f"VOC root {root} split {split!r}", **kw)


def images_by_stem(folder: DataPath, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, DataPath]:
    """stem -> file of a folder whose extension, in any case, is one of `extensions` (default: images); DataError
    if two share a stem (also `x.png` and `x.PNG`)."""
    files: dict[str, DataPath] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in extensions and path.is_file():
            if path.stem in files:
                raise DataError(f"{files[path.stem]} and {path} in {folder} share the stem {path.stem!r}; "
                                f"keep one of them")
            files[path.stem] = path
    return files


def pair_by_stem(image_dir: DataPath, mask_dir: DataPath, file_set: str | Path | None) -> list[Sample]:
    """(image, <mask_dir>/<stem>.png) pairs sorted by stem (.png in any case); DataError naming any image without
    a mask."""
    images = images_by_stem(existing_dir(image_dir, "image folder"))
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}")
    masks = images_by_stem(existing_dir(mask_dir, "annotation folder"), (".png",))
    samples = []
    for stem in restrict_ids(sorted(images), file_set, str(image_dir)):
        if stem not in masks:
            raise DataError(f"image {images[stem]} (stem {stem!r}) has no mask {mask_dir / f'{stem}.png'}")
        samples.append((images[stem], masks[stem]))
    return samples


def ade20k_dataset(root: str | Path, split: str, file_set: str | Path | None = None,
                   **kw: Any) -> SegmentationDataset:
    """ADE20K (ADEChallengeData2016): 151 classes, 0 = other (ignored in evaluation); split training|validation."""
    root = existing_dir(root, "ADE20K root")
    folder = _ADE20K_SPLITS.get(split, split)
    samples = pair_by_stem(root / "images" / folder, root / "annotations" / folder, file_set)
    log.info("ADE20K %s: %d images from %s", folder, len(samples), root)
    return SegmentationDataset(samples, ADE20K_INFO, source=f"ADE20K root {root} split {split!r}", **kw)


def _positive_int(value: Any, key: str, path: DataPath) -> int:
    """`value` if it is a positive int, else DataError naming the key and file."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def read_folder_info(path: str | os.PathLike | DataPath) -> DatasetInfo:
    """DatasetInfo from a folder dataset's dataset.yaml (num_classes, ignore_index, classes, name, palette)."""
    path = as_path(path)
    if not path.is_file():
        raise DataError(f"dataset metadata {path} does not exist (needs num_classes; optional ignore_index, "
                        f"classes, name)")
    try:
        meta = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"cannot read dataset metadata {path}: {err}") from err
    if not isinstance(meta, dict):
        raise DataError(f"dataset metadata {path} must be a mapping with num_classes, ignore_index, classes, name")
    classes = meta.get("classes")
    num_classes = _positive_int(meta.get("num_classes", len(classes) if classes else None), "num_classes", path)
    classes = classes or [f"class_{i}" for i in range(num_classes)]
    if len(classes) != num_classes:
        raise DataError(f"{path}: {len(classes)} class names for num_classes={num_classes}")
    ignore = meta.get("ignore_index")
    if ignore is not None and (isinstance(ignore, bool) or not isinstance(ignore, int)):
        raise DataError(f"{path}: ignore_index must be an integer or null, got {ignore!r}")
    try:
        return DatasetInfo(str(meta.get("name", path.parent.name)), num_classes, ignore,
                           tuple(str(c) for c in classes), False, meta.get("palette"))
    except DataError as err:
        raise DataError(f"{path}: {err}") from err


def folder_dataset(root: str | Path, split: str, file_set: str | Path | None = None,
                   **kw: Any) -> SegmentationDataset:
    """`<root>/images/<split>/*`, `<root>/annotations/<split>/<stem>.png` and `<root>/dataset.yaml`."""
    root = existing_dir(root, "dataset root")
    info = read_folder_info(root / "dataset.yaml")
    samples = pair_by_stem(root / "images" / split, root / "annotations" / split, file_set)
    log.info("%s %s: %d images from %s", info.name, split, len(samples), root)
    return SegmentationDataset(samples, info, source=f"dataset root {root} split {split!r}", **kw)


SEGMENTATION_DATASETS: Registry[Callable[..., SegmentationDataset]] = Registry("dataset kind")
SEGMENTATION_DATASETS.register("voc")(voc_dataset)
SEGMENTATION_DATASETS.register("ade20k")(ade20k_dataset)
SEGMENTATION_DATASETS.register("folder")(folder_dataset)


def build_dataset(kind: str, root: str | Path, split: str, file_set: str | Path | None = None,
                  **kw: Any) -> SegmentationDataset:
    """The dataset of a registered `kind` (voc, ade20k, folder, cityscapes, coco_*) whose `root` may be a folder, an
    uncompressed .tar or 'x.tar!/folder'; keywords go to SegmentationDataset."""
    return SEGMENTATION_DATASETS.get(kind)(root, split, file_set=file_set, **kw)

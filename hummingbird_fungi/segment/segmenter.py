"""In-context segmentation for users: a few annotated examples (or a saved bank) -> masks of new images.

The bank is filled by `memory_bank.build_memory_bank` and queried by `label_transfer.LabelTransfer`,
exactly as in the benchmark; the only additions are reading user inputs, choosing the network input
size, and upsampling patch class maps straight to each image's original size.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from hummingbird_fungi.config.schema import (
    DataOptions,
    FeatureOptions,
    FungiOptions,
    MemoryOptions,
    RetrievalOptions,
    SupportOptions,
    TransferOptions,
)
from hummingbird_fungi.data.custom import as_image, as_mask as as_id_map
from hummingbird_fungi.data.segmentation import DatasetInfo, SegmentationDataset, check_labels, read_folder_info
from hummingbird_fungi.data.transforms import EvalTransform, read_image, read_mask
from hummingbird_fungi.errors import ConfigError, DataError
from hummingbird_fungi.eval.hbird import build_memory, input_size_for, make_transfer, metric_summary
from hummingbird_fungi.eval.metrics import ConfusionMatrix
from hummingbird_fungi.features import PatchFeatures, build_patch_features
from hummingbird_fungi.memory.bank import MemoryBank, npy_shape, read_manifest
from hummingbird_fungi.models.encoders import Encoder
from hummingbird_fungi.models.factory import create_encoder
from hummingbird_fungi.retrieval.transfer import patch_probs_to_map, upsample_argmax, upsample_probs
from hummingbird_fungi.runtime import resolve_device, timed
from hummingbird_fungi.segment.visualize import palette as class_palette

log = logging.getLogger(__name__)

ImageInput = str | os.PathLike | Image.Image | np.ndarray
MaskInput = str | os.PathLike | Image.Image | np.ndarray
DEFAULT_LONG_SIDE = 448
VOC_VOID = 255
MAX_INFERRED_CLASSES = 1024  # an inferred class count above this is a void id taken for a class


# --------------------------------------------------------------------------- inputs


def as_rgb(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a file (EXIF applied, any mode), a PIL image (EXIF applied), an array or a tensor."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if not isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):
        raise TypeError(f"expected a path, PIL image, array or tensor, got {type(image).__name__}")
    return as_image(ImageOps.exif_transpose(image) if isinstance(image, Image.Image) else image, "the image")


def as_mask(mask: MaskInput) -> np.ndarray:
    """(h, w) int64 class ids from a label file, a single-channel PIL image, an integer array or a tensor."""
    if isinstance(mask, (str, os.PathLike)):
        return read_mask(mask)
    return as_id_map(mask, "the mask")


def source_name(source: Any, index: int) -> str:
    """A name for messages: the file path, or `<example i>` for in-memory inputs."""
    return str(source) if isinstance(source, (str, os.PathLike)) else f"<example {index}>"


def default_input_size(sizes: Sequence[tuple[int, int]], patch: int,
                       long_side: int = DEFAULT_LONG_SIDE) -> tuple[int, int]:
    """(H, W), multiples of `patch`, long side near `long_side`, with the median aspect of (h, w) `sizes`."""
    aspect = float(np.median([h / w for h, w in sizes]))  # h / w
    long_cells = max(1, round(long_side / patch))
    short_cells = max(1, round(long_cells * min(aspect, 1 / aspect)))
    if aspect <= 1:
        return short_cells * patch, long_cells * patch
    return long_cells * patch, short_cells * patch


def label_space(masks: Sequence[np.ndarray], num_classes: int | None, ignore_index: int | None,
                class_names: Sequence[str] | None = None, names: Sequence[str] | None = None) -> tuple[int, int | None]:
    """(num_classes, ignore_index): C is `num_classes`, else the number of class names, else the largest
    non-void id + 1 (with a warning; refused beyond MAX_INFERRED_CLASSES, e.g. a 16-bit void 65535 taken
    for a class); an unset void is 255 if used beside small ids. `names` name the masks in messages."""
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)
    if ignore_index is None and any((m == VOC_VOID).any() for m in masks):
        largest = max(int(m[m != VOC_VOID].max(initial=0)) for m in masks)
        if largest < VOC_VOID and (num_classes is None or num_classes <= VOC_VOID):
            log.info("masks use id 255 beside ids up to %d: treating 255 as void (pass ignore_index to change)",
                     largest)
            ignore_index = VOC_VOID
    if num_classes is None:
        largest = [int(m[m != ignore_index].max(initial=0)) if ignore_index is not None else int(m.max(initial=0))
                   for m in masks]
        top = int(np.argmax(largest))
        name = names[top] if names else f"<mask {top}>"
        num_classes = largest[top] + 1
        if num_classes > MAX_INFERRED_CLASSES:
            raise DataError(f"mask {name} holds id {largest[top]}, which would make {num_classes} classes: if it "
                            f"marks void pass ignore_index={largest[top]} (--ignore-index), else give num_classes, "
                            f"class names or a dataset.yaml")
        log.warning("no num_classes, class names or dataset.yaml: %d classes inferred from the largest id %d "
                    "(mask %s); if an id marks void, pass ignore_index (--ignore-index)", num_classes,
                    largest[top], name)
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        raise ConfigError(f"ignore_index {ignore_index} is a class id (< num_classes={num_classes}); "
                          f"void must lie outside [0, num_classes)")
    return num_classes, ignore_index


def check_examples(labels: Sequence[np.ndarray], names: Sequence[str], info: DatasetInfo) -> None:
    """Refuse example masks with ids outside the label space (naming the mask and ids) or with no class pixel."""
    present: set[int] = set()
    for name, label in zip(names, labels):
        check_labels(label, info, name)
        present.update(np.unique(label[(label >= 0) & (label < info.num_classes)]).tolist())
    if not present:
        raise DataError(f"every pixel of the {len(labels)} example masks is void (ignore id {info.ignore_index}): "
                        f"there is nothing to learn from ({', '.join(names[:5])})")
    if len(present) == 1:
        log.warning("the example masks hold one class only (%s): every pixel will be predicted as it",
                    info.class_names[present.pop()])


class ExampleSet(SegmentationDataset):
    """Decoded example images and masks held in memory, served like a dataset to the bank builder."""

    def __init__(self, images: list[Image.Image], masks: list[np.ndarray], names: list[str], info: DatasetInfo,
                 seed: int) -> None:
        super().__init__([(Path(n), None) for n in names], info, seed=seed, source="the examples")
        self.images, self.masks = images, masks

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The RGB image and (h, w) int64 mask of example `index`."""
        return self.images[index], self.masks[index]


def build_record(manifest: dict) -> dict:
    """How a bank's encoder was made (weights, pretrained, options): from `from_examples` or `build-memory`."""
    return manifest.get("segmenter") or manifest.get("model") or {}


def make_encoder(backbone: Any, weights: str | Path | None, pretrained: bool, backbone_kwargs: dict | None,
                 device: torch.device, seed: int) -> Encoder:
    """`backbone` as an encoder: a module or Encoder wrapped, a name loaded with its weights (random init seeded)."""
    from hummingbird_fungi.models.backbones import load_backbone

    if not isinstance(backbone, str):
        return create_encoder(backbone).to(device)
    torch.manual_seed(seed)
    return load_backbone(backbone, weights=None if weights is None else str(weights), pretrained=pretrained,
                         device=device, **(backbone_kwargs or {}))


# --------------------------------------------------------------------------- segmenter


def load_support(extractor: PatchFeatures, path: Path) -> None:
    """Give `extractor` the support set saved with the bank at `path`, or say that the bank lacks one."""
    file = path / "support_features.npy"
    if not file.is_file():
        raise ConfigError(f"memory bank {path} uses features with support negatives but holds no support set "
                          f"({file.name} is missing); rebuild it with from_examples and save it")
    images = path / "support_images.npy"
    for array in (file, images) if images.is_file() else (file,):
        npy_shape(array)  # a truncated file is named, not a numpy error
    extractor.set_support(torch.from_numpy(np.load(file)),
                          image_ids=torch.from_numpy(np.load(images)) if images.is_file() else None)


class InContextSegmenter:
    """A frozen ViT plus a memory bank of labelled patch features: k-NN label transfer segments new images."""

    def __init__(self, extractor: PatchFeatures, bank: MemoryBank, input_size: tuple[int, int],
                 normalize: str = "imagenet", k: int = 30, temperature: float = 0.02, backend: str = "torch",
                 backend_options: dict | None = None, match_orientation: bool = True, class_chunk: int = 32,
                 device: str | torch.device = "auto", timings: dict[str, float] | None = None) -> None:
        self.extractor, self.bank = extractor, bank
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.normalize, self.match_orientation = normalize, match_orientation
        self.device = resolve_device(device)
        self.timings = {} if timings is None else timings
        self.retrieval = RetrievalOptions(backend=backend, k=k, options=dict(backend_options or {}))
        self.transfer_options = TransferOptions(temperature=temperature, class_chunk=class_chunk)
        self.class_chunk = self.transfer_options.class_chunk
        self.settings = {"k": k, "temperature": temperature, "backend": backend,
                         "backend_options": dict(backend_options or {})}
        with timed(self.timings, "build_index_s"):
            self.transfer = make_transfer(bank, self.retrieval, self.transfer_options)
        self._transforms: dict[tuple[int, int], EvalTransform] = {}

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_examples(cls, images: Sequence[ImageInput], masks: Sequence[MaskInput],
                      backbone: Any = "dinov2_vits14", weights: str | Path | None = None,
                      features: str = "embeddings", feature_options: FungiOptions | dict | None = None,
                      input_size: tuple[int, int] | None = None, k: int = 30, temperature: float = 0.02,
                      backend: str = "torch", num_classes: int | None = None, ignore_index: int | None = None,
                      class_names: Sequence[str] | None = None, augment_epochs: int = 0,
                      memory_size: int | None = None, device: str = "auto", pretrained: bool = True,
                      backbone_kwargs: dict | None = None, normalize: str = "imagenet",
                      sampling: str = "label_aware", batch_size: int = 4, seed: int = 0,
                      long_side: int = DEFAULT_LONG_SIDE, palette: Sequence[Sequence[int]] | None = None,
                      dataset_yaml: str | Path | None = None, **options: Any) -> "InContextSegmenter":
        """Build the memory bank from annotated examples (paths, PIL images or arrays) held in RAM.

        Masks hold class ids. The label space is `num_classes`, `ignore_index`, `class_names` (and
        `palette`), else what `dataset_yaml` (a dataset.yaml file) says; without either C is the number
        of class names or, with a warning, the largest id + 1, and id 255 is void when the other ids
        are small (as in VOC). Ids outside the label space and masks without a class pixel are refused.
        The input size defaults to multiples of the patch with
        the long side near `long_side` and the examples' median aspect. `memory_size=None` keeps every
        patch; `augment_epochs=N` fills the bank from N passes of the benchmark's train augmentation
        instead of one clean pass. `backbone` is a name or any model `create_encoder` takes; `palette`
        ([r, g, b] per class) colours the written masks and overlays.
        Further keywords (backend_options, match_orientation, class_chunk) go to the constructor.
        """
        if len(images) != len(masks) or not images:
            raise DataError(f"need the same positive number of example images and masks, "
                            f"got {len(images)} and {len(masks)}")
        if feature_options and features != "fungi":
            raise ConfigError(f"feature options {sorted(feature_options)} given for {features!r} features")
        timings: dict[str, float] = {}
        device_ = resolve_device(device)
        if dataset_yaml is not None:
            described = read_folder_info(dataset_yaml)
            num_classes = described.num_classes if num_classes is None else num_classes
            ignore_index = described.ignore_index if ignore_index is None else ignore_index
            class_names = described.class_names if class_names is None else class_names
            palette = described.palette if palette is None else palette
        names = [source_name(image, i) for i, image in enumerate(images)]
        mask_names = [source_name(mask, i) for i, mask in enumerate(masks)]
        with timed(timings, "read_examples_s"):
            pictures = [as_rgb(image) for image in images]
            labels = [as_mask(mask) for mask in masks]
        for name, mask_name, picture, label in zip(names, mask_names, pictures, labels):
            if label.shape != (picture.height, picture.width):
                raise DataError(f"mask {mask_name} is {label.shape[1]}x{label.shape[0]} but its image {name} is "
                                f"{picture.width}x{picture.height} (width x height)")
        num_classes, ignore_index = label_space(labels, num_classes, ignore_index, class_names, mask_names)
        class_names = tuple(class_names or (f"class_{i}" for i in range(num_classes)))
        if len(class_names) != num_classes:
            raise ConfigError(f"{len(class_names)} class names for {num_classes} classes")
        info = DatasetInfo("examples", num_classes, ignore_index, class_names, False)
        check_examples(labels, mask_names, info)
        feature_section = FeatureOptions(
            kind=features,  # type: ignore[arg-type]
            fungi=FungiOptions.from_mapping(feature_options) if isinstance(feature_options, dict)
            else feature_options or FungiOptions(), support=SupportOptions(size=memory_size))
        memory = MemoryOptions(size=memory_size, augmentation_epochs=max(augment_epochs, 1),
                               augment=augment_epochs > 0, sampling=sampling, void="ignore")  # type: ignore[arg-type]
        data = DataOptions(normalize=normalize, batch_size=batch_size, num_workers=0)  # type: ignore[arg-type]
        RetrievalOptions(backend=backend, k=k), TransferOptions(temperature=temperature)  # checked before the model
        with timed(timings, "load_backbone_s"):
            net = make_encoder(backbone, weights, pretrained, backbone_kwargs, device_, seed)
        size = input_size_for(net, input_size) if input_size else default_input_size(
            [(p.height, p.width) for p in pictures], net.patch_size, long_side)
        record = {"weights": None if weights is None else str(weights),
                  "pretrained": net.weights_id != "random",
                  "backbone_kwargs": dict(backbone_kwargs or {}), "normalize": normalize,
                  "ignore_index": ignore_index, "seed": seed, "augment_epochs": augment_epochs}
        log.info("building a memory bank from %d examples at input %dx%d (H x W), %d classes, %s features",
                 len(pictures), size[0], size[1], num_classes, features)
        bank, extractor = build_memory(net, ExampleSet(pictures, labels, names, info, seed), input_size=size,
                                       features=feature_section, memory=memory, data=data, device=device_,
                                       seed=seed, timings=timings,
                                       manifest_extra={"segmenter": record, "palette": palette})
        return cls(extractor, bank, size, normalize=normalize, k=k, temperature=temperature, backend=backend,
                   device=device_, timings=timings, **options)

    @classmethod
    def from_memory(cls, path: str | Path, backbone: Any = None,
                    weights: str | Path | None = None, k: int = 30, temperature: float = 0.02,
                    backend: str = "torch", device: str = "auto", input_size: tuple[int, int] | None = None,
                    **options: Any) -> "InContextSegmenter":
        """Load a saved bank (from `save` or `hbfungi build-memory`) with the backbone, weights and feature
        options it records unless given; a bank built with other features is refused (BankMismatchError)."""
        timings: dict[str, float] = {}
        manifest = read_manifest(Path(path))
        record = build_record(manifest)
        recorded = manifest["features"]
        device_ = resolve_device(device)
        same_backbone = backbone is None or backbone == recorded["backbone"]
        if weights is None and same_backbone and record.get("weights"):
            weights = record["weights"]
            if not Path(weights).is_file():
                raise DataError(f"memory bank {path} was built with weights {weights}, which do not exist here; "
                                f"pass the weights file")
            log.info("using the weights the bank records: %s", weights)
        with timed(timings, "load_backbone_s"):
            net = make_encoder(backbone or recorded["backbone"], weights, record.get("pretrained", True),
                               record.get("backbone_kwargs"), device_, record.get("seed", 0))
        extractor = build_patch_features(recorded["kind"], net, recorded["options"])
        if extractor.needs_support:
            load_support(extractor, Path(path))
        with timed(timings, "load_memory_s"):
            bank = MemoryBank.load(path, expect_features=extractor.manifest())
        log.info("loaded memory bank %s: %d rows, %d classes", path, bank.count, bank.num_classes)
        normalize = record.get("normalize") or manifest.get("data", {}).get("normalize", "imagenet")
        return cls(extractor, bank, tuple(input_size or manifest["input_size"]), normalize=normalize, k=k,
                   temperature=temperature, backend=backend, device=device_, timings=timings, **options)

    def save(self, path: str | Path) -> Path:
        """Save the memory bank (with what built it, and a FUNGI support set) for `from_memory`."""
        return self.bank.save(path, extra=self.extractor.support_arrays())

    # ----------------------------------------------------------------- facts

    @property
    def backbone(self) -> Encoder:
        """The frozen encoder."""
        return self.extractor.encoder

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return self.bank.num_classes

    @property
    def class_names(self) -> list[str]:
        """Class names, index = class id."""
        return list(self.bank.manifest.get("class_names") or (f"class_{i}" for i in range(self.num_classes)))

    @property
    def ignore_index(self) -> int | None:
        """The void id of the masks the bank was built from (None if they had none)."""
        if "ignore_index" in self.bank.manifest:
            return self.bank.manifest["ignore_index"]
        return self.bank.manifest.get("segmenter", {}).get("ignore_index")  # banks saved before it was recorded

    @property
    def colours(self) -> np.ndarray:
        """(C, 3) uint8 class colours: the examples' dataset.yaml palette when given, else the default."""
        return class_palette(self.num_classes, self.bank.manifest.get("palette"))

    @property
    def mask_dtype(self) -> type:
        """uint8 for up to 256 classes, else uint16."""
        return np.uint8 if self.num_classes <= 256 else np.uint16

    def describe(self) -> dict[str, Any]:
        """What segments: backbone, weights, features, input size, retrieval settings and bank size."""
        record = build_record(self.bank.manifest)
        return {"backbone": self.backbone.name, "weights": record.get("weights"),
                "pretrained": record.get("pretrained"), "features": self.extractor.manifest(),
                "input_size": list(self.input_size), "match_orientation": self.match_orientation,
                **self.settings, "memory_rows": self.bank.count, "num_classes": self.num_classes,
                "class_names": self.class_names, "ignore_index": self.ignore_index,
                "num_examples": self.bank.manifest.get("num_images")}

    # ----------------------------------------------------------------- prediction

    def network_size(self, height: int, width: int) -> tuple[int, int]:
        """Network input (H, W) of an h x w image: the bank's size, turned to the image's orientation."""
        big, small = max(self.input_size), min(self.input_size)
        if self.match_orientation and height != width and self.input_size[0] != self.input_size[1]:
            return (big, small) if height > width else (small, big)
        return self.input_size

    def patch_maps(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """Patch-level class distributions (C, h', w') of RGB images, batched by network input size."""
        maps: list[torch.Tensor | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            groups[self.network_size(image.height, image.width)].append(i)
        for size, ids in groups.items():
            transform = self._transforms.setdefault(size, EvalTransform(size, normalize=self.normalize))
            batch = torch.stack([transform(images[i])[0] for i in ids]).to(self.device)  # (B, 3, H, W)
            probs = self.transfer(self.extractor(batch))  # (B, N, C)
            grid = self.backbone.grid_size(*size)
            for i, row in zip(ids, probs):
                maps[i] = patch_probs_to_map(row, grid)  # (C, h', w')
        return maps

    def predict_batch(self, images: Sequence[ImageInput], batch_size: int = 8) -> list[np.ndarray]:
        """Class-id masks (h, w) of each image at its original (EXIF-rotated) size."""
        out = []
        start = time.perf_counter()
        for first in range(0, len(images), batch_size):
            chunk = [as_rgb(image) for image in images[first:first + batch_size]]
            for image, maps in zip(chunk, self.patch_maps(chunk)):
                mask = upsample_argmax(maps, (image.height, image.width), self.class_chunk)  # (h, w)
                out.append(mask.numpy().astype(self.mask_dtype))
        self.timings["predict_s"] = self.timings.get("predict_s", 0.0) + time.perf_counter() - start
        return out

    def predict(self, image: ImageInput) -> np.ndarray:
        """Class-id mask (h, w), uint8 (uint16 beyond 256 classes), at the image's original size."""
        return self.predict_batch([image])[0]

    def predict_proba(self, image: ImageInput) -> np.ndarray:
        """Class scores (C, h, w) float32 at the image's original size (bilinear patch distributions)."""
        picture = as_rgb(image)
        maps = self.patch_maps([picture])[0]
        return upsample_probs(maps, (picture.height, picture.width)).numpy().astype(np.float32)

    # ----------------------------------------------------------------- metrics

    def confusion_matrix(self) -> ConfusionMatrix:
        """An empty confusion matrix for this label space (the void id ignored)."""
        return ConfusionMatrix(self.num_classes, ignore_index=self.ignore_index)

    def metrics(self, cm: ConfusionMatrix) -> dict[str, Any]:
        """mIoU (standard and reference), per-class IoU and pixel accuracy of a filled matrix."""
        return metric_summary(cm, self.class_names, self.ignore_index)

    def unscored_ids(self, mask: np.ndarray) -> Counter:
        """Pixel counts of the ground-truth ids outside the label space (neither a class nor the void id)."""
        outside = (mask < 0) | (mask >= self.num_classes)
        if self.ignore_index is not None:
            outside &= mask != self.ignore_index
        ids, counts = np.unique(mask[outside], return_counts=True)
        return Counter(dict(zip(ids.tolist(), counts.tolist())))

    def warn_unscored(self, counts: Counter, where: str = "the ground truth") -> None:
        """Log the ids `unscored_ids` found (metrics leave those pixels out)."""
        if counts:
            log.warning("%s holds ids outside the label space (classes 0..%d, void %s), not scored: %s", where,
                        self.num_classes - 1, self.ignore_index,
                        ", ".join(f"id {i}: {n} pixels" for i, n in sorted(counts.items())))

    def evaluate(self, images: Sequence[ImageInput], masks: Sequence[MaskInput], batch_size: int = 8) -> dict:
        """Segment `images` and score them against `masks` at their original size (ids outside the label
        space are left out, with a warning that counts them)."""
        cm, unscored = self.confusion_matrix(), Counter()
        with tqdm(total=len(images), desc="evaluate", unit="img") as progress:
            for first in range(0, len(images), batch_size):
                preds = self.predict_batch(images[first:first + batch_size], batch_size)
                for pred, mask in zip(preds, masks[first:first + batch_size]):
                    truth = as_mask(mask)
                    unscored += self.unscored_ids(truth)
                    cm.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(truth))
                progress.update(len(preds))
        self.warn_unscored(unscored)
        return self.metrics(cm)

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
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from hummingbird_fungi.config.schema import (
    DataOptions,
    FeatureOptions,
    MemoryOptions,
    RetrievalOptions,
    TransferOptions,
)
from hummingbird_fungi.data.custom import as_image, as_mask as as_id_map
from hummingbird_fungi.data.segmentation import (DatasetInfo, SegmentationDataset, check_labels, palette_problem,
                                                 read_folder_info)
from hummingbird_fungi.data.transforms import EvalTransform, read_image, read_mask
from hummingbird_fungi.errors import ConfigError, DataError
from hummingbird_fungi.eval.metrics import ConfusionMatrix, metric_summary
from hummingbird_fungi.features import PatchFeatures, build_patch_features
from hummingbird_fungi.features.transform import TransformedFeatures
from hummingbird_fungi.memory.bank import MemoryBank, npy_shape, read_manifest
from hummingbird_fungi.memory.build import build_memory, read_transform, transformed
from hummingbird_fungi.models.encoders import Encoder
from hummingbird_fungi.models.factory import create_encoder
from hummingbird_fungi.retrieval.predict import Prediction, QueryBatch, predict
from hummingbird_fungi.retrieval.transfer import ExtraCandidates, LabelTransfer, patch_probs_to_map, upsample_probs
from hummingbird_fungi.runtime import resolve_device, timed
from hummingbird_fungi.segment.defaults import (SEGMENT_DATA, SEGMENT_FEATURES, SEGMENT_MEMORY, SEGMENT_RETRIEVAL,
                                                SEGMENT_TRANSFER)
from hummingbird_fungi.segment.visualize import palette as class_palette

log = logging.getLogger(__name__)

ImageInput = str | os.PathLike | Image.Image | np.ndarray
MaskInput = str | os.PathLike | Image.Image | np.ndarray
DEFAULT_LONG_SIDE = 448
Sections = tuple[FeatureOptions, RetrievalOptions, TransferOptions]
Tuner = Callable[..., tuple[Sections, dict[str, Any]]]  # examples, encoder, sections... -> tuned sections, record
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


def _encoder(backbone: Any, device: torch.device, **named: Any) -> Encoder:
    """`backbone` on `device`: a name made by `create_encoder` with `named` (weights, pretrained, seed, timm
    keywords), a module or Encoder wrapped as it is."""
    return create_encoder(backbone, device=device, **(named if isinstance(backbone, str) else {}))


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
                 normalize: str = "imagenet", retrieval: RetrievalOptions | None = None,
                 transfer: TransferOptions | None = None, match_orientation: bool = True,
                 device: str | torch.device = "auto", timings: dict[str, float] | None = None,
                 non_finite: str = "error") -> None:
        self.extractor, self.bank, self.non_finite = extractor, bank, non_finite  # features.non_finite
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.normalize, self.match_orientation = normalize, match_orientation
        self.device = resolve_device(device)
        self.timings = {} if timings is None else timings
        self.retrieval, self.transfer_options = retrieval or RetrievalOptions(), transfer or TransferOptions()
        self.settings = {"k": self.retrieval.k, "temperature": self.transfer_options.temperature,
                         "backend": self.retrieval.backend, "backend_options": dict(self.retrieval.options)}
        with timed(self.timings, "build_index_s"):
            self.transfer = LabelTransfer.from_options(bank, self.retrieval, self.transfer_options)
        self._transforms: dict[tuple[int, int], EvalTransform] = {}
        self.tuning: dict[str, Any] | None = None  # how `from_examples(tune=...)` chose the settings

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_examples(cls, images: Sequence[ImageInput], masks: Sequence[MaskInput],
                      backbone: Any = "dinov2_vits14", *, weights: str | Path | None = None, pretrained: bool = True,
                      backbone_kwargs: dict | None = None, input_size: tuple[int, int] | None = None,
                      long_side: int = DEFAULT_LONG_SIDE, features: FeatureOptions | None = None,
                      memory: MemoryOptions | None = None, retrieval: RetrievalOptions | None = None,
                      transfer: TransferOptions | None = None, data: DataOptions | None = None,
                      num_classes: int | None = None, ignore_index: int | None = None,
                      class_names: Sequence[str] | None = None, palette: Sequence[Sequence[int]] | None = None,
                      dataset_yaml: str | Path | None = None, device: str = "auto", seed: int = 0,
                      match_orientation: bool = True, tune: Tuner | None = None
                      ) -> "InContextSegmenter":
        """Build the memory bank from annotated examples (paths, PIL images or arrays) held in RAM.

        Masks hold class ids. The label space is `num_classes`, `ignore_index`, `class_names` (and
        `palette`), else what `dataset_yaml` (a dataset.yaml file) says; without either C is the number
        of class names or, with a warning, the largest id + 1, and id 255 is void when the other ids
        are small (as in VOC). Ids outside the label space and masks without a class pixel are refused.
        The input size defaults to multiples of the patch with the long side near `long_side` and the
        examples' median aspect. The option sections are those of `evaluate`; their defaults here are
        a user's (SEGMENT_MEMORY: every patch, no augmentation; SEGMENT_DATA: ImageNet normalisation).
        `backbone` is a name or any model `create_encoder` takes; `palette` ([r, g, b] per class) colours
        the written masks and overlays. `tune` (e.g. `eval.tune.ExampleTuner()`) picks the features, k and
        temperature on the examples themselves (held out one at a time) before the bank is built; it returns
        the three sections and a record of its choice, kept in `tuning` (and `describe`).
        """
        features, memory = features or SEGMENT_FEATURES, memory or SEGMENT_MEMORY
        data, retrieval, transfer = data or SEGMENT_DATA, retrieval or SEGMENT_RETRIEVAL, transfer or SEGMENT_TRANSFER
        if len(images) != len(masks) or not images:
            raise DataError(f"need the same positive number of example images and masks, "
                            f"got {len(images)} and {len(masks)}")
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
        problem = None if palette is None else palette_problem(palette, num_classes)
        if problem:
            raise ConfigError(f"palette: {problem}")
        info = DatasetInfo("examples", num_classes, ignore_index, class_names, False)
        check_examples(labels, mask_names, info)
        with timed(timings, "load_backbone_s"):
            net = _encoder(backbone, device_, weights=weights, pretrained=pretrained, seed=seed,
                           **(backbone_kwargs or {}))
        size = net.input_size(input_size) if input_size else default_input_size(
            [(p.height, p.width) for p in pictures], net.patch_size, long_side)
        record = {"weights": None if weights is None else str(weights),
                  "pretrained": net.weights_id != "random",
                  "backbone_kwargs": dict(backbone_kwargs or {}), "normalize": data.normalize,
                  "ignore_index": ignore_index, "seed": seed}
        examples, tuning = ExampleSet(pictures, labels, names, info, seed), None
        if tune is not None:
            with timed(timings, "tune_s"):
                (features, retrieval, transfer), tuning = tune(
                    examples, net, input_size=size, features=features, memory=memory, retrieval=retrieval,
                    transfer=transfer, data=data, device=device_, seed=seed)
        log.info("building a memory bank from %d examples at input %dx%d (H x W), %d classes, %s features",
                 len(pictures), size[0], size[1], num_classes, features.kind)
        bank, extractor = build_memory(net, examples, input_size=size,
                                       features=features, memory=memory, data=data, device=device_,
                                       seed=seed, timings=timings,
                                       manifest_extra={"segmenter": record, "palette": palette})
        segmenter = cls(extractor, bank, size, normalize=data.normalize, retrieval=retrieval, transfer=transfer,
                        match_orientation=match_orientation, device=device_, timings=timings,
                        non_finite=features.non_finite)
        segmenter.tuning = tuning
        return segmenter

    @classmethod
    def from_memory(cls, path: str | Path, backbone: Any = None, *, weights: str | Path | None = None,
                    retrieval: RetrievalOptions | None = None, transfer: TransferOptions | None = None,
                    device: str = "auto", input_size: tuple[int, int] | None = None,
                    match_orientation: bool = True) -> "InContextSegmenter":
        """Load a saved bank (from `save` or `hbfungi build-memory`) with the backbone, weights and feature
        options it records unless given, and the feature transform it records (`save`); a bank built with other
        features is refused (BankMismatchError)."""
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
            net = _encoder(backbone or recorded["backbone"], device_, weights=weights,
                           pretrained=record.get("pretrained", True), seed=record.get("seed", 0),
                           **(record.get("backbone_kwargs") or {}))
        extractor = build_patch_features(recorded["kind"], net, recorded["options"])
        if extractor.needs_support:
            load_support(extractor, Path(path))
        with timed(timings, "load_memory_s"):
            bank = MemoryBank.load(path, expect_features=extractor.manifest())
            if "transform" in manifest:
                bank, extractor = transformed(bank, extractor, read_transform(Path(path), manifest["transform"],
                                                                              str(path)))
        if "transform" not in manifest and (Path(path) / "transforms").is_dir():
            log.warning("memory bank %s holds feature transforms for benchmark runs (%s) but records none for "
                        "queries: segmenting with its raw features", path, Path(path) / "transforms")
        log.info("loaded memory bank %s: %d rows, %d classes", path, bank.count, bank.num_classes)
        normalize = record.get("normalize") or manifest.get("data", {}).get("normalize", "imagenet")
        return cls(extractor, bank, tuple(input_size or manifest["input_size"]), normalize=normalize,
                   retrieval=retrieval, transfer=transfer, match_orientation=match_orientation, device=device_,
                   timings=timings)

    def save(self, path: str | Path) -> Path:
        """Save the memory bank (its raw rows, with what built it, a FUNGI support set and the feature transform:
        its recipe in the manifest, its arrays beside the shards) for `from_memory`."""
        manifest = {key: value for key, value in self.bank.manifest.items() if key != "transform"}
        extra = self.extractor.support_arrays()
        if isinstance(self.extractor, TransformedFeatures):
            manifest["transform"] = self.extractor.transform.recipe
            extra = {**extra, **self.extractor.transform.arrays()}
        return replace(self.bank, manifest=manifest).save(path, extra=extra)

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
                "num_examples": self.bank.manifest.get("num_images"),
                **({"tuning": self.tuning} if self.tuning is not None else {})}

    # ----------------------------------------------------------------- prediction

    def network_size(self, height: int, width: int) -> tuple[int, int]:
        """Network input (H, W) of an h x w image: the bank's size, turned to the image's orientation."""
        big, small = max(self.input_size), min(self.input_size)
        if self.match_orientation and height != width and self.input_size[0] != self.input_size[1]:
            return (big, small) if height > width else (small, big)
        return self.input_size

    def query_batches(self, images: Sequence[Image.Image], targets: Sequence[Any] | None = None
                      ) -> list[QueryBatch]:
        """RGB images grouped by network input size into query batches; keys are positions in `images`, masks
        are wanted at each image's own size, `targets` (ground truth or None per image) are scored."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            groups[self.network_size(image.height, image.width)].append(i)
        batches = []
        for size, ids in groups.items():
            transform = self._transforms.setdefault(size, EvalTransform(size, normalize=self.normalize))
            batches.append(QueryBatch(
                self.backbone.grid_size(*size), [(images[i].height, images[i].width) for i in ids],
                images=torch.stack([transform(images[i])[0] for i in ids]),  # (B, 3, H, W)
                targets=None if targets is None else [targets[i] for i in ids], keys=ids))
        return batches

    def predictions(self, images: Sequence[Image.Image], targets: Sequence[Any] | None = None,
                    extra: ExtraCandidates | None = None) -> list[Prediction]:
        """The predict-and-score loop on RGB images (targets: ground truth or None per image), in input order."""
        start = time.perf_counter()
        out = sorted(predict(self.query_batches(images, targets), self.transfer, self.extractor,
                             ignore_index=self.ignore_index, class_chunk=self.transfer_options.class_chunk,
                             device=self.device, extra=extra, non_finite=self.non_finite),
                     key=lambda prediction: prediction.key)
        self.timings["predict_s"] = self.timings.get("predict_s", 0.0) + time.perf_counter() - start
        return out

    def mask(self, prediction: Prediction) -> np.ndarray:
        """The class-id mask (h, w) of a prediction, uint8 (uint16 beyond 256 classes)."""
        return prediction.masks[self.transfer.setting].numpy().astype(self.mask_dtype)

    def predict_batch(self, images: Sequence[ImageInput], batch_size: int = 8) -> list[np.ndarray]:
        """Class-id masks (h, w) of each image at its original (EXIF-rotated) size."""
        out = []
        for first in range(0, len(images), batch_size):
            chunk = [as_rgb(image) for image in images[first:first + batch_size]]
            out += [self.mask(prediction) for prediction in self.predictions(chunk)]
        return out

    def predict(self, image: ImageInput) -> np.ndarray:
        """Class-id mask (h, w), uint8 (uint16 beyond 256 classes), at the image's original size."""
        return self.predict_batch([image])[0]

    def predict_proba(self, image: ImageInput) -> np.ndarray:
        """Class scores (C, h, w) float32 at the image's original size (bilinear patch distributions)."""
        picture = as_rgb(image)
        grid = self.backbone.grid_size(*self.network_size(picture.height, picture.width))
        probs = self.predictions([picture])[0].probs  # (N, C)
        return upsample_probs(patch_probs_to_map(probs, grid), (picture.height, picture.width)).numpy().astype(
            np.float32)

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
                truths = [as_mask(mask) for mask in masks[first:first + batch_size]]
                for truth in truths:
                    unscored += self.unscored_ids(truth)
                chunk = [as_rgb(image) for image in images[first:first + batch_size]]
                for prediction in self.predictions(chunk, [torch.from_numpy(truth) for truth in truths]):
                    cm.matrix += prediction.confusions[self.transfer.setting]
                progress.update(len(chunk))
        self.warn_unscored(unscored)
        return self.metrics(cm)

"""Image classification datasets for the kNN evaluation: digits, ImageFolder trees, torchvision sets.

Every dataset is read from disk as it is (torchvision sets with ``download=False``), so
nothing ever waits on the network; a missing dataset raises `DataError` naming its root.
Items are ``(PIL RGB image, class index)``; `targets` gives all labels without decoding images.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from hummingbird_fungi.errors import DataError
from hummingbird_fungi.registry import Registry

log = logging.getLogger(__name__)

DIGITS_TRAIN_FRACTION = 0.6  # per class, the fixed stratified digits split
DIGITS_SPLIT_SEED = 0
EUROSAT_TRAIN_FRACTION = 0.8  # EuroSAT ships without splits; same stratified rule


@dataclass
class ClassificationData:
    """One split of a classification dataset: items are (PIL RGB image, label)."""

    name: str  # dataset kind, e.g. "digits", "imagefolder", "cifar10"
    split: str
    root: str | None
    items: Any  # indexable: items[i] -> (image, label) with image a PIL image or uint8 array
    targets: np.ndarray  # (N,) int64
    classes: list[str]
    files: list[str] = field(default_factory=list)  # relative paths when known (fingerprint)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, _ = self.items[index]
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        return image.convert("RGB"), int(self.targets[index])

    @property
    def ids(self) -> list[str]:
        """Item ids for seeded subsets: the relative file paths when known for every item, else the positions."""
        return list(self.files) if len(self.files) == len(self) else [str(i) for i in range(len(self))]

    def subset(self, indices: np.ndarray) -> "ClassificationData":
        """The items at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return ClassificationData(self.name, self.split, self.root, _Subset(self.items, indices),
                                  self.targets[indices], self.classes,
                                  [self.files[i] for i in indices] if self.files else [])

    def identity(self) -> dict[str, Any]:
        """What identifies this split's content (for feature-cache keys)."""
        digest = hashlib.sha1(self.targets.astype(np.int64).tobytes())
        digest.update("\n".join(self.files).encode())
        return {"name": self.name, "split": self.split, "root": self.root, "count": len(self),
                "num_classes": len(self.classes), "fingerprint": digest.hexdigest()[:16]}


@dataclass
class _Subset:
    """Items of a base sequence at given indices."""

    base: Any
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.base[int(self.indices[index])]


def stratified_split(targets: np.ndarray, train_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Per class, a seeded permutation; the first round(fraction n_c) go to train -> sorted index arrays."""
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        train.append(members[:int(round(train_fraction * len(members)))])
    train_ids = np.sort(np.concatenate(train))
    test_ids = np.setdiff1d(np.arange(len(targets)), train_ids)
    return {"train": train_ids, "test": test_ids}


def _pick_split(splits: dict[str, np.ndarray], split: str, name: str) -> np.ndarray:
    """Indices of `split`, or a DataError listing the valid names."""
    if split not in splits:
        raise DataError(f"{name} has splits {sorted(splits)}, not {split!r}")
    return splits[split]


def load_digits(split: str) -> ClassificationData:
    """scikit-learn's 1,797 8x8 handwritten digits as dark ink on white, fixed stratified 60/40 split."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    pixels = (255 - bunch.images * (255.0 / 16.0)).round().astype(np.uint8)  # (N, 8, 8), ink dark
    targets = bunch.target.astype(np.int64)
    ids = _pick_split(stratified_split(targets, DIGITS_TRAIN_FRACTION, DIGITS_SPLIT_SEED), split, "digits")
    items = [(pixels[i], int(targets[i])) for i in ids]
    files = [f"digit_{i:04d}" for i in ids]
    return ClassificationData("digits", split, None, items, targets[ids], [str(c) for c in range(10)], files)


def load_imagefolder(root: str | Path, split: str) -> ClassificationData:
    """`root/<split>/<class>/<image>` (or `root/<class>/<image>` when split is empty)."""
    from torchvision.datasets import ImageFolder

    folder = Path(root) / split if split else Path(root)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} not found (expected {root}/<split>/<class>/<image>)")
    try:
        dataset = ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"cannot read image folder {folder}: {exc}") from exc
    files = [str(Path(path).relative_to(folder)) for path, _ in dataset.samples]
    return ClassificationData("imagefolder", split, str(Path(root).resolve()), dataset,
                              np.asarray(dataset.targets, dtype=np.int64), list(dataset.classes), files)


def load_cub(root: str | Path, split: str) -> ClassificationData:
    """CUB-200-2011 from its own metadata files (images.txt, image_class_labels.txt, train_test_split.txt)."""
    base = Path(root) / "CUB_200_2011" if (Path(root) / "CUB_200_2011").is_dir() else Path(root)
    needed = ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"]
    missing = [name for name in needed if not (base / name).is_file()]
    if missing:
        raise DataError(f"CUB-200-2011 not found under {root}: missing {', '.join(missing)}")
    if split not in ("train", "test"):
        raise DataError(f"cub has splits ['test', 'train'], not {split!r}")
    paths = dict(line.split() for line in (base / "images.txt").read_text().splitlines() if line)
    labels = dict(line.split() for line in (base / "image_class_labels.txt").read_text().splitlines() if line)
    is_train = dict(line.split() for line in (base / "train_test_split.txt").read_text().splitlines() if line)
    classes = [line.split(" ", 1)[1] for line in (base / "classes.txt").read_text().splitlines() if line]
    wanted = "1" if split == "train" else "0"
    ids = sorted((k for k in paths if is_train[k] == wanted), key=int)
    files = [paths[k] for k in ids]
    targets = np.asarray([int(labels[k]) - 1 for k in ids], dtype=np.int64)
    items = _FileItems([base / "images" / f for f in files], targets)
    return ClassificationData("cub", split, str(base.resolve()), items, targets, classes, files)


@dataclass
class _FileItems:
    """Image files read lazily with PIL."""

    paths: list[Path]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB"), int(self.targets[index])


def _torchvision_factories() -> dict[str, Callable[[str, str], Any]]:
    """torchvision dataset constructors by kind, (root, split) -> dataset, never downloading."""
    from torchvision import datasets as tv

    def cifar(cls: Any) -> Callable[[str, str], Any]:
        def make(root: str, split: str) -> Any:
            if split not in ("train", "test"):
                raise DataError(f"{cls.__name__} has splits ['test', 'train'], not {split!r}")
            return cls(root, train=split == "train", download=False)
        return make

    return {
        "flowers102": lambda root, split: tv.Flowers102(root, split=split, download=False),
        "cifar10": cifar(tv.CIFAR10),
        "cifar100": cifar(tv.CIFAR100),
        "dtd": lambda root, split: tv.DTD(root, split=split, download=False),
        "food101": lambda root, split: tv.Food101(root, split=split, download=False),
        "pets": lambda root, split: tv.OxfordIIITPet(root, split=split, target_types="category", download=False),
        "cars": lambda root, split: tv.StanfordCars(root, split=split, download=False),
        "aircraft": lambda root, split: tv.FGVCAircraft(root, split=split, download=False),
        "eurosat": lambda root, split: tv.EuroSAT(root, download=False),
        "imagenet": lambda root, split: tv.ImageNet(root, split=split),
    }


TORCHVISION_KINDS = ("flowers102", "cifar10", "cifar100", "dtd", "food101", "pets", "cars", "aircraft",
                     "eurosat", "imagenet")


def _targets_of(dataset: Any) -> np.ndarray:
    """All labels of a torchvision dataset without decoding images."""
    for attribute in ("targets", "_labels"):
        if hasattr(dataset, attribute):
            return np.asarray(getattr(dataset, attribute), dtype=np.int64)
    if hasattr(dataset, "_samples"):
        return np.asarray([label for _, label in dataset._samples], dtype=np.int64)
    raise DataError(f"cannot read the labels of {type(dataset).__name__}")


def _files_of(dataset: Any) -> list[str]:
    """Image file names of a torchvision dataset when it lists them (cache fingerprints)."""
    if hasattr(dataset, "_image_files"):
        return [Path(p).name for p in dataset._image_files]
    if hasattr(dataset, "samples"):
        return [Path(p).name for p, _ in dataset.samples]
    if hasattr(dataset, "_samples"):
        return [Path(p).name for p, _ in dataset._samples]
    return []


def load_torchvision(kind: str, root: str | Path, split: str) -> ClassificationData:
    """A torchvision classification dataset already on disk (download=False); DataError if absent."""
    if not Path(root).is_dir():
        raise DataError(f"{kind}: dataset root {root} does not exist (nothing is ever downloaded)")
    make_split = kind == "eurosat"
    try:
        dataset = _torchvision_factories()[kind](str(root), "train" if make_split else split)
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        raise DataError(f"{kind}: dataset not found or incomplete under {root} "
                        f"(nothing is downloaded; place the files there): {exc}") from exc
    except ValueError as exc:
        raise DataError(f"{kind} under {root}: bad split {split!r}: {exc}") from exc
    targets = _targets_of(dataset)
    classes = [str(c) for c in getattr(dataset, "classes", range(int(targets.max()) + 1))]
    data = ClassificationData(kind, split, str(Path(root).resolve()), dataset, targets, classes, _files_of(dataset))
    if make_split:
        ids = _pick_split(stratified_split(targets, EUROSAT_TRAIN_FRACTION, DIGITS_SPLIT_SEED), split, kind)
        data = data.subset(ids)
        data.split = split
    return data


CLASSIFICATION_DATASETS: Registry[Callable[[Any, str], ClassificationData]] = Registry("data.kind")
CLASSIFICATION_DATASETS.register("digits")(lambda root, split: load_digits(split))  # built in: no root
CLASSIFICATION_DATASETS.register("imagefolder")(load_imagefolder)
CLASSIFICATION_DATASETS.register("cub")(load_cub)
for _kind in TORCHVISION_KINDS:
    CLASSIFICATION_DATASETS.register(_kind)(functools.partial(load_torchvision, _kind))


def load_classification(kind: str, root: str | Path | None, split: str) -> ClassificationData:
    """Any supported dataset split by kind: digits (built in), imagefolder, cub or a torchvision dataset."""
    kind = kind.lower()
    loader = CLASSIFICATION_DATASETS.get(kind)
    if root is None and kind != "digits":
        raise DataError(f"data.kind={kind} needs data.root=DIR")
    data = loader(root, split)
    if len(data) == 0:
        raise DataError(f"{kind} split {split!r} under {root} holds no images")
    log.info("%s/%s: %d images, %d classes", kind, split, len(data), len(data.classes))
    return data

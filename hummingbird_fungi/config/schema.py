"""The typed options of every stage, shared by the Python API, the presets and the command line.

`HbirdConfig` is the schema of `hbfungi hbird`, `build-memory` and `evaluate`; `KnnConfig` the
schema of `hbfungi knn`. The sections (`MemoryOptions`, `RetrievalOptions`, `FungiOptions`, ...)
are what `evaluate`, `InContextSegmenter` and the feature extractors take. Protocol background
for each key: docs/protocol.md.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal

from hummingbird_fungi.config.typed import Section, at_least, in_unit_interval, option, positive
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.registry import find_registry

Normalize = Literal["reference", "imagenet"]
Autocast = Literal["auto", "bf16", "off"]
Dtype = Literal["float16", "float32"]
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def parse_size(value: Any) -> tuple[int, int]:
    """An input size as (H, W), height first everywhere: an int (square), [H, W], or an 'HxW' string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, str) and value.lower().count("x") == 1:
        height, width = value.lower().split("x")
        return int(height), int(width)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return value[0], value[1]
    raise ValueError("expected an int, [H, W] or 'HxW' (height first)")


def check_device(value: str) -> str | None:
    """A check for a torch device name."""
    return None if _DEVICE.match(value) else "expected auto, cpu, cuda, cuda:N or mps"


def registered(where: str, default: Any = dataclasses.MISSING, *, factory: Callable[[], list[str]] | None = None,
               doc: str) -> Any:
    """A field holding a name (or a list of names) of the Registry at `where` ('module:NAME'); names other than the
    default ones are looked up there, so building the defaults imports neither torch nor the registry's module."""
    builtin = factory() if factory is not None else [default]

    def check(value: str | list[str]) -> str | None:
        names = [name for name in (value if isinstance(value, list) else [value]) if name not in builtin]
        problems = map(find_registry(where).check, names) if names else ()
        return next((problem for problem in problems if problem), None)

    return option(default, factory=factory, check=check, doc=doc)


# --------------------------------------------------------------------------- model and data


@dataclass
class ModelOptions(Section):
    """The named backbone of the presets and the command line (the Python API also takes any module)."""

    key = "model"
    name: str = option("dino_vits16", doc="short name (dino_vits16, dinov2_vits14, ...) or any timm ViT name")
    weights: str | None = option(None, doc="local checkpoint (timm or FAIR layout); null: hub weights")
    pretrained: bool = option(True, doc="false: random initialisation (smoke tests)")
    input_size: tuple[int, int] = option((512, 512), parse=parse_size, check=positive,
                                         doc="network input, height first: [H, W], 'HxW' or an int (square)")


def check_subset(value: int | float) -> str | None:
    """A check for a subset size: a count (an integer >= 1) or a fraction (a number strictly between 0 and 1)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return None if value >= 1 else "a count must be >= 1"
    return None if 0 < value < 1 else "a fraction must be in (0, 1); give a count as an integer"


@dataclass
class SplitOptions(Section):
    """The two splits of a dataset (memory or kNN train rows, and evaluation) and how they are loaded."""

    key = "data"
    root: str | None = option(None, doc="dataset root: a folder, an uncompressed .tar, or 'x.tar!/folder'")
    train_split: str = option("train", doc="split of the memory bank (kNN: of the train rows)")
    eval_split: str = option("val", doc="split that is segmented or classified and scored")
    subset: int | float | None = option(None, check=check_subset,
                                        doc="seeded subset of the train split: a count >= 1 or a fraction in (0, 1)")
    eval_subset: int | float | None = option(None, check=check_subset,
                                             doc="seeded subset of the evaluation split: a count or a fraction")
    subset_seed: int | None = option(None, check=at_least(0), doc="seed of both subsets; null: the run's seed")
    batch_size: int = option(4, check=at_least(1), doc="images per batch")
    num_workers: int = option(2, check=at_least(0), doc="data-loading worker processes")


@dataclass
class DataOptions(SplitOptions):
    """A segmentation dataset's memory (train) and evaluation splits."""

    kind: str = registered("hummingbird_fungi.data.segmentation:SEGMENTATION_DATASETS", "voc",
                           doc="dataset layout and label space: a registered dataset kind (`hbfungi list datasets`)")
    train_split: str = option("trainaug", doc="split that fills the memory bank")
    train_file_set: str | None = option(None, doc="file with the ids of the memory images")
    eval_file_set: str | None = option(None, doc="file with the ids of the evaluation images")
    normalize: Normalize = option("reference", doc="reference: the public code's std (0.229, 0.224, 0.255)")
    eval_resolution: Literal["input", "original"] = option("input", doc="score at the network input or label size")


# --------------------------------------------------------------------------- features


@dataclass
class FungiOptions(Section):
    """Patch-level FUNGI: the loss, its gradient layer, the projection and how the parts combine."""

    key = "features.fungi"
    objective: str = registered("hummingbird_fungi.features.fungi_patch:PATCH_OBJECTIVES", "infonce",
                                doc="loss per image: a registered patch objective (`hbfungi list objectives`)")
    head_dim: int = option(96, check=at_least(1), doc="output size of the random head")
    head_seed: int = option(0, doc="seed of the random head")
    projection: str = registered("hummingbird_fungi.features.projection:PROJECTIONS", "structured",
                                 doc="a registered gradient projection; dense: the reference's +-1 matrix")
    rank: int = option(4, check=at_least(1), doc="rank of the structured projection")
    projection_distribution: Literal["sign", "gaussian"] = option("sign", doc="entries of the structured factors")
    projection_seed: int = option(0, doc="seed of the projection")
    out_dim: int | None = option(None, check=at_least(1), doc="projected gradient size; null: the token size")
    tau: float = option(0.07, check=positive, doc="InfoNCE temperature")
    kl_temperature: float = option(15.0, check=positive, doc="temperature of the kl objective's softmax")
    student_temperature: float = option(0.1, check=positive, doc="dino objective: temperature of the patch")
    teacher_temperature: float = option(0.04, check=positive, doc="dino objective: temperature of the mirrored "
                                                                  "patch (centred over the image)")
    tau_placement: Literal["positive", "both"] = option("positive", doc="which InfoNCE terms tau divides")
    negatives: Literal["none", "support", "support_scrambled"] = option("none", doc="InfoNCE negatives")
    neg_k: int = option(5, check=at_least(1), doc="support neighbours retrieved per token")
    n_neg: int = option(2, check=at_least(1), doc="negatives kept per token (<= neg_k)")
    keep_prob: float = option(0.5, check=in_unit_interval, doc="probability of keeping each negative")
    neg_seed: int = option(0, doc="seed of the negative keep-mask")
    exclude_same_image: bool = option(True, doc="skip support rows of the query's own image")
    layer: str | None = option(None, doc="dotted path of the nn.Linear whose gradient is used; null: the "
                                         "encoder's patch default (last block's attn.qkv for timm and hub "
                                         "ViTs; the reference used blocks.-1.attn.proj)")
    grad_weight: float = option(1.0, check=at_least(0), doc="weight w of the gradient part")
    autocast: Autocast = option("auto", doc="bf16 autocast: auto (CUDA only), bf16 or off")
    token_chunk: int = option(1024, check=at_least(1), doc="tokens per projection block")
    gradient_dtype: Literal["auto", "float32", "bfloat16"] = option(
        "auto", doc="dtype of the matmuls that make the gradient half (the backward after the layer and the "
                    "projection): auto (bfloat16 under autocast and where matmuls run natively in bf16: AMX CPUs, "
                    "GPUs from compute capability 8.0; else float32), float32, or bfloat16; tokens stay as computed")

    def validate(self) -> None:
        if self.n_neg > self.neg_k:
            raise ConfigError(f"{self.key}.n_neg={self.n_neg} must be <= {self.key}.neg_k={self.neg_k}")
        if self.negatives != "none" and self.objective != "infonce":
            raise ConfigError(f"{self.key}.negatives={self.negatives!r} needs objective=infonce, "
                              f"got {self.objective!r}")


@dataclass
class SupportOptions(Section):
    """The support bank of raw patch embeddings that supplies FUNGI negatives."""

    key = "features.support"
    size: int | None = option(102400, check=at_least(1), doc="support rows; null: every patch")
    augmentation_epochs: int = option(1, check=at_least(1), doc="augmented passes over the memory images")


@dataclass
class TransformOptions(Section):
    """A label-free transform fitted on the memory rows and applied to bank and query features (PCA, whitening)."""

    key = "features.transform"
    pca: bool = option(False, doc="fit a PCA on a sample of the memory rows; off: raw features (the reference)")
    dims: int | None = option(None, check=at_least(1),
                              doc="axes kept, largest variance first; null: every axis (whitened: at most rows - 1)")
    whiten: bool = option(True, doc="divide each axis by the square root of its eigenvalue (identity covariance)")
    epsilon: float = option(0.0, check=at_least(0), doc="added to each eigenvalue before whitening")
    shrinkage: Literal["none", "ledoit_wolf"] = option(
        "none", doc="eigenvalues of the covariance shrunk towards their mean by the Ledoit-Wolf intensity before "
                    "whitening (few rows: e.g. one example image), or none")
    fit_rows: int = option(200000, check=at_least(1), doc="rows of the seeded uniform sample the PCA is fitted on")
    min_rows_per_dim: float | None = option(None, check=positive,
                                            doc="fewer memory rows than this many per feature dimension: no transform "
                                                "(a warning says so); null: always")


@dataclass
class FeatureOptions(Section):
    """Which patch features fill the memory bank and query it."""

    key = "features"
    kind: str = registered("hummingbird_fungi.features:PATCH_FEATURES", "embeddings",
                           doc="a registered patch feature kind (`hbfungi list features`)")
    fungi: FungiOptions = option(factory=FungiOptions)
    support: SupportOptions = option(factory=SupportOptions)
    transform: TransformOptions = option(factory=TransformOptions)
    non_finite: Literal["error", "drop"] = option("error", doc="feature rows holding NaN or inf (bank and queries): "
                                                               "error names the images; drop leaves them out "
                                                               "with a warning")


# --------------------------------------------------------------------------- memory, retrieval, transfer


@dataclass
class MemoryOptions(Section):
    """How the memory bank is filled and stored."""

    key = "memory"
    size: int | None = option(102400, check=at_least(1), doc="bank rows; null: every patch of every image")
    augmentation_epochs: int = option(1, check=at_least(1), doc="passes over the memory images")
    augment: bool = option(True, doc="train augmentation (colour jitter, random resized crop)")
    sampling: Literal["label_aware", "uniform"] = option("label_aware", doc="which patches a bounded bank keeps")
    void: Literal["auto", "background", "ignore"] = option("auto", doc="void pixels in soft labels")
    dtype: Dtype = option("float16", doc="stored feature type")
    label_dtype: Dtype = option("float16", doc="stored soft-label type")
    shard_images: int = option(256, check=at_least(1), doc="images per shard on disk")
    path: str | None = option(None, doc="bank folder (built if missing, reused if present)")

    def void_to_background(self, dataset_default: bool) -> bool:
        """Whether void pixels count as background in soft labels (`auto`: the dataset's own rule)."""
        return dataset_default if self.void == "auto" else self.void == "background"


@dataclass
class RetrievalOptions(Section):
    """The nearest-neighbour search over the bank."""

    key = "retrieval"
    k: int = option(30, check=at_least(1), doc="neighbours per patch")
    backend: str = registered("hummingbird_fungi.retrieval.indexes:BACKENDS", "exact",
                              doc="a registered retrieval backend (`hbfungi list backends`); exact: faiss on CPU "
                                  "when installed, else torch")
    options: dict[str, Any] = option(factory=dict, doc="backend options (e.g. nprobe, device)")


Rescore = Literal["auto", "always", "never"]


def rescore_mode(value: Any) -> Any:
    """`transfer.rescore` as a mode: true/false (the former switch) read as 'always'/'never', other values as given."""
    if isinstance(value, bool):
        return "always" if value else "never"
    return value


@dataclass
class TransferOptions(Section):
    """How neighbours' soft labels become a patch's class distribution."""

    key = "transfer"
    temperature: float = option(0.02, check=positive, doc="softmax temperature over neighbour cosines")
    rescore: Rescore = option("auto", parse=rescore_mode,
                              doc="neighbour cosines: always re-read rows from the bank (the reference), never "
                                  "(index scores), auto (re-read only for approximate or reduced-precision indexes)")
    rerank: int = option(0, check=at_least(0), doc="candidates re-ranked exactly (approximate backends)")
    class_chunk: int = option(32, check=at_least(1), doc="classes upsampled at a time")


@dataclass
class HbirdConfig(Section):
    """Schema of `hbfungi hbird | build-memory | evaluate`."""

    seed: int = option(0, check=at_least(0), doc="seed of every random choice")
    device: str = option("auto", check=check_device, doc="auto, cpu, cuda, cuda:N")
    model: ModelOptions = option(factory=ModelOptions)
    data: DataOptions = option(factory=DataOptions)
    features: FeatureOptions = option(factory=FeatureOptions)
    memory: MemoryOptions = option(factory=MemoryOptions)
    retrieval: RetrievalOptions = option(factory=RetrievalOptions)
    transfer: TransferOptions = option(factory=TransferOptions)


@dataclass
class TuneOptions(Section):
    """The grid `hbfungi tune` scores on held-out memory images (never the evaluated split)."""

    key = "tune"
    folds: int = option(3, check=at_least(2), doc="seeded folds of memory images, each held out once (more "
                                                  "folds than images: leave one image out)")
    rows: int | None = option(102400, check=at_least(1), doc="bank rows per fold at most, drawn as the builder "
                                                              "draws (bounds the cost); null: the preset's memory")
    features: list[str] = registered("hummingbird_fungi.features:PATCH_FEATURES",
                                     factory=lambda: ["embeddings", "fungi"], doc="feature kinds tried")
    layers: list[str | None] = option(factory=lambda: [None], doc="FUNGI gradient layers tried (null: the "
                                                                  "encoder's default)")
    transforms: list[Literal["none", "whiten"]] = option(factory=lambda: ["none", "whiten"],
                                                        doc="none: raw features; whiten: features.transform with "
                                                            "pca=true, whiten=true")
    k: list[int] = option(factory=lambda: [5, 10, 20, 30, 50], check=at_least(1), doc="neighbours tried")
    temperatures: list[float] = option(factory=lambda: [0.01, 0.02, 0.05, 0.1], check=positive,
                                       doc="vote temperatures tried")
    resamples: int = option(1000, check=at_least(1), doc="bootstrap resamples of the held-out images")

    def validate(self) -> None:
        for name in ("features", "layers", "transforms", "k", "temperatures"):
            if not getattr(self, name):
                raise ConfigError(f"{self.key}.{name} must list at least one value")


# --------------------------------------------------------------------------- image-level kNN


@dataclass
class KLOptions(Section):
    """Image FUNGI KL objective: softmax of a random head against the uniform distribution."""

    key = "features.kl"
    batch_size: int = option(64, check=at_least(1), doc="images per gradient batch")
    temperature: float = option(15.0, check=positive, doc="softmax temperature")
    latent_dim: int = option(768, check=at_least(1), doc="head output size")


@dataclass
class DinoOptions(Section):
    """Image FUNGI DINO objective: self-distillation between global and local views."""

    key = "features.dino"
    batch_size: int = option(16, check=at_least(1), doc="images per gradient batch")
    global_views: int = option(2, check=at_least(1), doc="teacher (global) views")
    local_views: int = option(10, check=at_least(0), doc="extra student (local) views")
    global_scale: tuple[float, float] = option((0.25, 1.0), check=positive, doc="area range of global crops")
    local_scale: tuple[float, float] = option((0.05, 0.25), check=positive, doc="area range of local crops")
    latent_dim: int = option(2048, check=at_least(1), doc="head output size")
    teacher_temperature: float = option(0.07, check=positive, doc="teacher softmax temperature")
    student_temperature: float = option(0.1, check=positive, doc="student softmax temperature")


@dataclass
class SimCLROptions(Section):
    """Image FUNGI SimCLR objective: InfoNCE between an image's patch views against negative images."""

    key = "features.simclr"
    batch_size: int = option(36, check=at_least(1), doc="images per gradient batch")
    num_patches: int = option(4, check=at_least(1), doc="views per side")
    stride_scale: float = option(6.0, check=positive, doc="window stride divisor")
    latent_dim: int = option(96, check=at_least(1), doc="head output size")
    negatives: int = option(256, check=at_least(0), doc="negative images (0: none)")
    temperature: float = option(0.07, check=positive, doc="InfoNCE temperature")
    tau_placement: Literal["positive", "both"] = option("both", doc="which InfoNCE terms tau divides")


@dataclass
class ImageFeatureOptions(Section):
    """Image-level feature blocks: the embedding and the projected gradients of each objective."""

    key = "features"
    embedding: bool = option(True, doc="include the embedding block")
    objectives: list[str] = registered("hummingbird_fungi.features.fungi_image:IMAGE_OBJECTIVES",
                                       factory=lambda: ["kl", "dino", "simclr"],
                                       doc="gradient blocks: registered image objectives (`hbfungi list objectives`)")
    projection: str = registered("hummingbird_fungi.features.projection:PROJECTIONS", "dense",
                                 doc="a registered gradient projection (dense, the paper's; structured)")
    rank: int = option(4, check=at_least(1), doc="rank of the structured projection")
    projection_distribution: Literal["sign", "gaussian"] = option("sign", doc="entries of the structured factors")
    layer: str | None = option(None, doc="gradient layer; null: the encoder's default")
    autocast: Autocast = option("auto", doc="bf16 autocast: auto (CUDA only), bf16 or off")
    cache_dir: str | None = option(None, doc="feature cache folder; null: no cache")
    chunk_size: int = option(256, check=at_least(1), doc="images per cache chunk")
    kl: KLOptions = option(factory=KLOptions)
    dino: DinoOptions = option(factory=DinoOptions)
    simclr: SimCLROptions = option(factory=SimCLROptions)


@dataclass
class ClassificationDataOptions(SplitOptions):
    """An image-classification dataset's train and evaluation splits."""

    kind: str = option("digits", doc="digits, imagefolder, cub, or a torchvision dataset (cifar10, ...)")
    eval_split: str = option("test", doc="split that is classified")
    batch_size: int = option(64, check=at_least(1), doc="images per embedding batch")


@dataclass
class KnnOptions(Section):
    """The kNN classifier and the train settings it is run on."""

    key = "knn"
    k: int = option(20, check=at_least(1), doc="neighbours")
    pca: int | None = option(512, check=at_least(1), doc="PCA size (when smaller than rows and dim)")
    vote: list[Literal["uniform", "weighted"]] = option(factory=lambda: ["uniform"], doc="vote rules")
    temperature: float = option(0.07, check=positive, doc="temperature of the weighted vote")
    shots: list[int | Literal["full"]] = option(factory=lambda: ["full", 5], check=at_least(1),
                                                doc="train rows per class: full or a number")
    few_shot_rule: list[Literal["first", "random"]] = option(factory=lambda: ["first"],
                                                             doc="first in dataset order, or seeded random")
    few_shot_seeds: list[int] = option(factory=lambda: [0, 1, 2], doc="seeds of random few-shot draws")
    combinations: Literal["all"] | list[str] = option("all", doc="'all' or names like emb+kl")


@dataclass
class KnnConfig(Section):
    """Schema of `hbfungi knn`."""

    seed: int = option(0, check=at_least(0), doc="seed of every random choice")
    device: str = option("auto", check=check_device, doc="auto, cpu, cuda, cuda:N")
    model: ModelOptions = option(factory=lambda: ModelOptions(name="dinov2_vits14", input_size=(224, 224)))
    data: ClassificationDataOptions = option(factory=ClassificationDataOptions)
    features: ImageFeatureOptions = option(factory=ImageFeatureOptions)
    knn: KnnOptions = option(factory=KnnOptions)

    def validate(self) -> None:
        if self.model.input_size[0] != self.model.input_size[1]:
            raise ConfigError(f"model.input_size={list(self.model.input_size)}: image-level FUNGI needs a square input")

"""Feature studies: extract FUNGI parts once per image, compose them into rows, score every row's predictions.

A study extracts, once per image, the patch tokens and the projected gradients of several FUNGI
variants (`FungiPatchFeatures.parts`) into the feature cache (`features.cache`, float16), then scores
many compositions of them without a new forward pass: which gradients are concatenated, their weight
w, how many projected coordinates each keeps, an optional PCA (`features.pca`, with whitening) fitted
on the memory rows. The composition's memory rows become an in-RAM bank and `retrieval.predict`
answers every (k, temperature) from one search. Two protocols: a segmentation preset (`ImageStudy`:
the train split is the memory, whole or drawn per image by the bank builder's own rule; one confusion
matrix per eval image) and DAVIS first-frame (`DavisStudy`: per sequence the first frame is the
memory; one mean J per sequence). `eval.bootstrap.compare` puts a paired interval on each row's
difference to the embeddings. The driver is tools/fungi_study.py; docs/protocol.md#comparing-feature-variants.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from hummingbird_fungi.config.schema import HbirdConfig
from hummingbird_fungi.data.transforms import EvalTransform, read_image, read_mask
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.eval.bootstrap import compare
from hummingbird_fungi.eval.hbird import config_dataset
from hummingbird_fungi.eval.metrics import foreground_confusion, jaccard
from hummingbird_fungi.features.cache import FeatureCache
from hummingbird_fungi.features.fungi_patch import FungiPatchFeatures, combine
from hummingbird_fungi.features.pca import Pca
from hummingbird_fungi.memory.bank import MemoryBank
from hummingbird_fungi.memory.build import file_list_digest, memory_transform
from hummingbird_fungi.memory.labels import bank_patches, patches_per_image, patchify_labels, soft_labels
from hummingbird_fungi.models.encoders import Encoder
from hummingbird_fungi.retrieval.predict import Prediction, QueryBatch, predict
from hummingbird_fungi.retrieval.transfer import LabelTransfer, Setting

log = logging.getLogger(__name__)

TOKENS, MASKS = "tokens", "masks"  # the cached parts besides the gradients
QUERY_IMAGES = 16  # query images per predict batch
PCA_ROWS = 200_000  # memory rows a PCA is fitted on at most (a seeded sample beyond)
DAVIS_FRAMES = 4  # DAVIS frames per extraction batch (and cache chunk)
DAVIS_VOID = 255


@dataclass(frozen=True)
class Composition:
    """One study row's feature: normalise([x̂ ; w φ̂_1 ; ... ]) of the named gradient parts, optionally PCA'd."""

    name: str
    grads: tuple[str, ...] = ()  # () = the plain embeddings
    weight: float = 1.0
    dims: int | None = None  # keep the first `dims` projected coordinates of each gradient
    pca: int | None = None
    whiten: bool = False


def parse_composition(text: str) -> Composition:
    """'NAME' (embeddings) or 'NAME:grads=a+b,w=0.5,dims=96,pca=256,whiten' -> Composition."""
    name, _, spec = text.partition(":")
    values: dict = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key == "grads":
            values["grads"] = tuple(filter(None, value.split("+")))
        elif key == "w":
            values["weight"] = float(value)
        elif key in ("dims", "pca"):
            values[key] = int(value)
        elif key == "whiten":
            values["whiten"] = value in ("", "1", "true")
        else:
            raise ConfigError(f"composition {text!r}: unknown key {key!r} (grads, w, dims, pca, whiten)")
    if not name:
        raise ConfigError(f"composition {text!r} has no name")
    if values.get("whiten") and not values.get("pca"):
        raise ConfigError(f"composition {text!r}: whiten needs pca=N")
    return Composition(name, **values)


def compose(tokens: Tensor, grads: Sequence[Tensor], composition: Composition) -> Tensor:
    """Unit features (n, D) from tokens (n, E) and the composition's gradient parts [(n, P_i)] (PCA not applied)."""
    if not composition.grads:
        return F.normalize(tokens.float(), dim=-1)
    parts = [g[:, :composition.dims] if composition.dims else g for g in grads]
    return combine(tokens, parts, composition.weight)


# --------------------------------------------------------------------------- cached parts


@dataclass
class PartSet:
    """The cached parts of a set of images: "tokens" (n N, E) and each gradient's projection (n N, P), float16,
    and optionally "masks" (n, H W) int16; one cache chunk holds the rows of one extraction batch of images."""

    caches: dict[str, FeatureCache]
    patches: int  # N, patches per image
    mask_size: tuple[int, int] | None = None  # (H, W) of the cached masks

    @classmethod
    def open(cls, root: Path, where: tuple[str, ...], key: dict[str, Any], encoder: Encoder,
             extractors: dict[str, FungiPatchFeatures], num_images: int, grid: tuple[int, int], batch: int,
             mask_size: tuple[int, int] | None = None) -> "PartSet":
        """The caches under `root`/`where`/ of `num_images` images (`key`: what defines them besides each part's
        options), chunked by `batch` images."""
        patches = grid[0] * grid[1]
        shapes = {TOKENS: (patches, encoder.embed_dim, {}, "float16"),
                  **{name: (patches, e.projection.out_dim, e.options(), "float16") for name, e in extractors.items()}}
        if mask_size is not None:
            shapes[MASKS] = (1, mask_size[0] * mask_size[1], {}, "int16")
        caches = {name: FeatureCache(root, (*where, name), {**key, "options": options}, num_images * rows, dim,
                                     chunk_size=batch * rows, dtype=dtype)
                  for name, (rows, dim, options, dtype) in shapes.items()}
        return cls(caches, patches, mask_size)

    @property
    def num_images(self) -> int:
        """Number of images n."""
        return self.caches[TOKENS].count // self.patches

    def fill(self, dataset: Dataset, encoder: Encoder, extractors: dict[str, FungiPatchFeatures],
             device: torch.device, desc: str, num_workers: int = 0) -> None:
        """Compute the chunks any cache lacks from `dataset` items {"image": (3, H, W)[, "mask": (H, W)]}: the patch
        tokens of a plain forward pass, the projection of each gradient missing there, the masks."""
        missing = {name: {index for index, _, _ in cache.missing()} for name, cache in self.caches.items()}
        chunks = sorted(set().union(*missing.values()))
        if not chunks:
            return
        batch = self.caches[TOKENS].chunk_size // self.patches
        ids = [i for chunk in chunks for i in range(chunk * batch, min((chunk + 1) * batch, self.num_images))]
        log.info("%s: extracting %s for %d of %d images", desc,
                 ", ".join(name for name, todo in missing.items() if todo), len(ids), self.num_images)
        loader = DataLoader(Subset(dataset, ids), batch_size=batch, num_workers=num_workers)
        for chunk, items in tqdm(zip(chunks, loader), desc=desc, total=len(chunks), unit="batch"):
            images = items["image"].to(device)
            for name, cache in self.caches.items():
                if chunk not in missing[name]:
                    continue
                if name == TOKENS:
                    with torch.no_grad():
                        rows = encoder(images)  # (B, N, E)
                elif name == MASKS:
                    rows = items["mask"]  # (B, H, W)
                else:
                    rows = extractors[name].parts(images)[1]  # (B, N, P)
                cache.put(chunk, rows.reshape(-1, cache.dim).cpu().numpy())

    def features(self, composition: Composition, rows: np.ndarray | slice = slice(None)) -> Tensor:
        """The composition's unit features (r, D) of the patch rows `rows` (flat ids over images x patches)."""
        def read(name: str) -> Tensor:
            return torch.from_numpy(self.caches[name].load()[rows])

        return compose(read(TOKENS), [read(g) for g in composition.grads], composition)

    def masks(self) -> np.ndarray:
        """The cached masks (n, H, W) int16."""
        return self.caches[MASKS].load().reshape(-1, *self.mask_size)


def encoder_key(encoder: Encoder, size: tuple[int, int]) -> dict[str, Any]:
    """What in a cached part depends on the network: the encoder, its weights and the input size."""
    return {"encoder": f"{encoder.name}:{encoder.weights_id}", "input_size": list(size)}


# --------------------------------------------------------------------------- protocols


@dataclass
class ImageStudy:
    """A segmentation preset: the train split's patches are the memory, every eval image is scored."""

    memory: PartSet
    queries: PartSet
    counts: Tensor  # (n, N, C) class counts of the memory images' patches
    targets: list[Tensor]  # (H, W) int64 eval masks at the input size
    grid: tuple[int, int]
    num_classes: int
    ignore_index: int | None
    sampling: str  # memory.sampling: the rule of a bounded bank
    seed: int
    input_size: tuple[int, int]


@dataclass
class DavisSequence:
    """One DAVIS sequence: parts of the first frame (the memory) and the scored frames, in that order."""

    parts: PartSet
    counts: Tensor  # (1, N, 2) class counts of the first frame's patches
    targets: list[np.ndarray]  # (H, W) masks of the scored frames at their own size


@dataclass
class DavisStudy:
    """DAVIS first frame: per sequence the first frame is the memory and every frame_step-th later one is scored."""

    sequences: dict[str, DavisSequence]
    grid: tuple[int, int]
    input_size: tuple[int, int]


def image_study(config: HbirdConfig, encoder: Encoder, extractors: dict[str, FungiPatchFeatures], cache: Path,
                device: torch.device) -> ImageStudy:
    """Cached parts and masks of both splits of a segmentation preset (extracted where the cache lacks them)."""
    size = encoder.input_size(config.model.input_size)
    grid = encoder.grid_size(*size)
    data, memory = config.data, config.memory
    splits = {"train": config_dataset(config, "train").with_transform(
                  memory_transform(size, data.normalize, memory), seed=config.seed),
              "eval": config_dataset(config, "eval").with_transform(EvalTransform(size, normalize=data.normalize))}
    parts = {}
    for split, dataset in splits.items():
        augment = split == "train" and memory.augment
        key = {**encoder_key(encoder, size), "images": file_list_digest(dataset), "normalize": data.normalize,
               "augment": augment, **({"seed": config.seed} if augment else {})}
        parts[split] = PartSet.open(cache, (split,), key, encoder, extractors, len(dataset), grid, data.batch_size,
                                    mask_size=size)
        parts[split].fill(dataset, encoder, extractors, device, f"{split} features", data.num_workers)
    info = splits["eval"].info
    counts = patchify_labels(torch.from_numpy(parts["train"].masks().astype(np.int64)), encoder.patch_size,
                             info.num_classes, memory.void_to_background(info.void_to_background))
    targets = list(torch.from_numpy(parts["eval"].masks().astype(np.int64)))
    return ImageStudy(parts["train"], parts["eval"], counts, targets, grid, info.num_classes, info.ignore_index,
                      memory.sampling, config.seed, size)


class _Frames(Dataset):
    """Video frames as {"image": (3, H, W)} through an eval transform."""

    def __init__(self, files: Sequence[Path], transform: EvalTransform) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"image": self.transform(read_image(self.files[index]))[0]}


def davis_study(root: Path, encoder: Encoder, extractors: dict[str, FungiPatchFeatures], cache: Path,
                device: torch.device, size: tuple[int, int], frame_step: int,
                names: Sequence[str] | None = None) -> DavisStudy:
    """Cached parts of each sequence's first frame and every `frame_step`-th later one (`root`: JPEGImages/,
    Annotations/; `names`: the sequences, default all), with the memory's label counts and the scored masks."""
    transform = EvalTransform(size, normalize="imagenet")
    grid = encoder.grid_size(*size)
    sequences = {}
    for name in names or sorted(p.name for p in (root / "JPEGImages").iterdir() if p.is_dir()):
        frames = sorted((root / "JPEGImages" / name).glob("*.jpg"))
        chosen = [frames[0]] + frames[frame_step::frame_step]
        key = {**encoder_key(encoder, size), "frames": [p.name for p in chosen], "normalize": "imagenet"}
        parts = PartSet.open(cache, (name,), key, encoder, extractors, len(chosen), grid, DAVIS_FRAMES)
        parts.fill(_Frames(chosen, transform), encoder, extractors, device, name)
        masks = [read_mask(root / "Annotations" / name / f"{p.stem}.png") for p in chosen]
        first = transform(read_image(chosen[0]), masks[0])[1]
        counts = patchify_labels(first[None].long(), encoder.patch_size, 2, False)
        sequences[name] = DavisSequence(parts, counts, masks[1:])
    return DavisStudy(sequences, grid, size)


# --------------------------------------------------------------------------- scoring


def memory_rows(study: ImageStudy, size: int | None) -> tuple[np.ndarray | slice, int]:
    """Flat memory-row ids of a bank of `size` rows (None: every patch) as the builder draws it (memory.sampling,
    run seed, epoch 0), and their number."""
    num_images, patches = study.counts.shape[:2]
    n_img = patches_per_image(size, num_images, 1, patches)
    if n_img == patches:
        return slice(None), num_images * patches
    rows = np.concatenate([bank_patches(study.counts[i], n_img, study.sampling, study.seed, 0, i).numpy()
                           + i * patches for i in range(num_images)])
    return rows, len(rows)


def transfer_predictions(memory: Tensor, labels: Tensor, queries: Tensor, composition: Composition,
                         grid: tuple[int, int], sizes: Sequence[tuple[int, int]], settings: Sequence[Setting],
                         targets: Sequence[Tensor] | None = None,
                         ignore_index: int | None = None) -> Iterator[Prediction]:
    """One `Prediction` per query image from memory rows (M, D) with soft labels (M, C) and query rows (n N, D)
    (`sizes`: each mask's (H, W)); every setting from one exact search, after the composition's PCA fitted on the
    memory (at most M components) and renormalisation."""
    if composition.pca:
        pca = Pca.fit(memory, min(composition.pca, len(memory)), composition.whiten, max_rows=PCA_ROWS)
        memory, queries = F.normalize(pca(memory), dim=-1), F.normalize(pca(queries), dim=-1)
    return predict_rows(memory, labels, queries, grid, sizes, settings, targets, ignore_index,
                        {"kind": "study", "options": asdict(composition)})


def predict_rows(memory: Tensor, labels: Tensor, queries: Tensor, grid: tuple[int, int],
                 sizes: Sequence[tuple[int, int]], settings: Sequence[Setting], targets: Sequence[Tensor] | None = None,
                 ignore_index: int | None = None, features: dict[str, Any] | None = None) -> Iterator[Prediction]:
    """One `Prediction` per query image from unit memory rows (M, D) with soft labels (M, C) and unit query rows
    (n N, D), every setting from one exact search of an in-RAM bank (`features`: its manifest's feature record)."""
    manifest = {"features": features or {"kind": "rows"}, "num_classes": labels.shape[1], "count": len(memory)}
    bank = MemoryBank.from_arrays(memory.numpy(), labels.numpy(), manifest)
    # the exact index answers cosines of unit rows already: no rescoring
    transfer = LabelTransfer.from_bank(bank, "torch", k=max(k for k, _ in settings), rescore=False, device="cpu")
    queries = queries.reshape(-1, grid[0] * grid[1], queries.shape[-1])  # (n, N, D)
    batches = (QueryBatch(grid, sizes[s:s + QUERY_IMAGES], features=queries[s:s + QUERY_IMAGES],
                          targets=None if targets is None else targets[s:s + QUERY_IMAGES])
               for s in range(0, len(queries), QUERY_IMAGES))
    return predict(batches, transfer, settings=settings, ignore_index=ignore_index)


def score_images(study: ImageStudy, composition: Composition, rows: np.ndarray | slice,
                 settings: Sequence[Setting]) -> dict[Setting, np.ndarray]:
    """{(k, T): (n, C, C) per-image confusion matrices} of one composition with the memory rows `rows`."""
    labels = soft_labels(study.counts.reshape(-1, study.num_classes)[rows])
    predictions = transfer_predictions(study.memory.features(composition, rows), labels,
                                       study.queries.features(composition), composition, study.grid,
                                       [tuple(t.shape) for t in study.targets], settings, study.targets,
                                       study.ignore_index)
    matrices: dict[Setting, list[np.ndarray]] = {setting: [] for setting in settings}
    for prediction in predictions:
        for setting, matrix in prediction.confusions.items():
            matrices[setting].append(matrix.numpy())
    return {setting: np.stack(values) for setting, values in matrices.items()}


def score_davis(study: DavisStudy, composition: Composition, settings: Sequence[Setting]) -> dict[Setting, np.ndarray]:
    """{(k, T): (S,) per-sequence mean J} of one composition, each sequence against its first frame."""
    per_sequence: dict[Setting, list[float]] = {setting: [] for setting in settings}
    patches = study.grid[0] * study.grid[1]
    for sequence in study.sequences.values():
        feats = sequence.parts.features(composition)
        labels = soft_labels(sequence.counts.reshape(-1, 2))
        predictions = transfer_predictions(feats[:patches], labels, feats[patches:], composition, study.grid,
                                           [t.shape for t in sequence.targets], settings)
        frames: dict[Setting, list[float]] = {setting: [] for setting in settings}
        for prediction, target in zip(predictions, sequence.targets):
            for setting, mask in prediction.masks.items():
                frames[setting].append(jaccard(foreground_confusion(mask.numpy(), target, DAVIS_VOID)))
        for setting, values in frames.items():
            per_sequence[setting].append(float(np.mean(values)))
    return {setting: np.array(values) for setting, values in per_sequence.items()}


def tuned_comparisons(rows: list[dict[str, Any]], scores: dict[tuple, np.ndarray],
                      draws: np.ndarray) -> list[dict[str, Any]]:
    """Each row name at its best k/T against the embeddings at theirs (both picked on the scored set), from table
    `rows` ({"row", "k", "temperature", "score"}) and `scores` {(row, k, T): per-unit scores or matrices}."""
    def best(name: str) -> dict:
        return max((r for r in rows if r["row"] == name), key=lambda r: r["score"])

    base = best("embeddings")
    out = []
    for name in dict.fromkeys(r["row"] for r in rows):
        row = best(name)
        result = compare(scores[("embeddings", base["k"], base["temperature"])],
                         scores[(name, row["k"], row["temperature"])], draws)
        out.append({"row": name, "k": row["k"], "temperature": row["temperature"], "score": row["score"],
                    "embeddings_k": base["k"], "embeddings_temperature": base["temperature"],
                    **{key: result[key] for key in ("difference", "low", "high", "excludes_zero")}})
    return out

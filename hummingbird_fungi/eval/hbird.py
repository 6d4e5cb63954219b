"""The Hummingbird evaluation of any encoder: fill a memory bank, retrieve, transfer labels, score.

`evaluate` is the typed entry point (an encoder, two datasets, option sections); the command
line, `InContextSegmenter` and `hbird_evaluation` (open-hummingbird-eval's signature) all call
the functions here. The protocol itself is described in docs/protocol.md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from hummingbird_fungi.config.schema import (
    DataOptions,
    FeatureOptions,
    HbirdConfig,
    MemoryOptions,
    RetrievalOptions,
    TransferOptions,
    check_device,
)
from hummingbird_fungi.data.segmentation import SegmentationDataset, build_dataset, collate
from hummingbird_fungi.data.subsets import subset_seed
from hummingbird_fungi.data.transforms import EvalTransform
from hummingbird_fungi.distributed import rank_and_world
from hummingbird_fungi.errors import ConfigError, worker_errors_unwrapped
from hummingbird_fungi.eval.metrics import ConfusionMatrix, metric_summary
from hummingbird_fungi.features import PatchFeatures
from hummingbird_fungi.fileio import check_no_overlap, preflight
from hummingbird_fungi.memory.bank import MemoryBank, partial_path, read_manifest
from hummingbird_fungi.memory.build import build_memory
from hummingbird_fungi.models.encoders import Encoder
from hummingbird_fungi.models.factory import create_encoder
from hummingbird_fungi.retrieval.indexes import check_index_options
from hummingbird_fungi.retrieval.predict import QueryBatch, predict
from hummingbird_fungi.retrieval.transfer import LabelTransfer
from hummingbird_fungi.runtime import resolve_device, timed, versions

log = logging.getLogger(__name__)

# open-hummingbird-eval dataset names -> (our dataset kind, memory split, evaluation split)
OHE_DATASETS = {"voc": ("voc", "trainaug", "val"), "ade20k": ("ade20k", "training", "validation"),
                "cityscapes": ("cityscapes", "train", "val"), "coco-stuff": ("coco_stuff", "train", "val"),
                "coco-thing": ("coco_things", "train", "val")}
# open-hummingbird-eval ScaNN parameter names -> ours
OHE_SCANN_PARAMS = {"num_reordering_candidates": "reorder", "anisotropic_quantization_threshold": "aq_threshold",
                    "dimensions_per_block": "dims_per_block"}


# --------------------------------------------------------------------------- the benchmark


def evaluate_bank(extractor: PatchFeatures, bank: MemoryBank, eval_set: SegmentationDataset, *,
                  input_size: tuple[int, int], retrieval: RetrievalOptions, transfer: TransferOptions,
                  data: DataOptions, device: torch.device, timings: dict[str, float] | None = None,
                  non_finite: str = "error", per_image: bool = False,
                  label_transfer: LabelTransfer | None = None) -> dict:
    """Segment `eval_set` with `bank` and return the metric summary (`non_finite`: `features.non_finite`); with
    `per_image` also each image's path (`per_image_keys`) and (C, C) matrix (`per_image_confusions`, (N, C, C)).
    `label_transfer`, when given, is used instead of one built from `retrieval` and `transfer` over `bank`."""
    timings = {} if timings is None else timings
    original = data.eval_resolution == "original"
    eval_set = eval_set.with_transform(EvalTransform(input_size, normalize=data.normalize),
                                       keep_original_mask=original)
    if list(input_size) != bank.manifest["input_size"]:
        log.warning("evaluating at input size %s with a bank built at %s", list(input_size),
                    bank.manifest["input_size"])
    info = eval_set.info
    if info.num_classes != bank.num_classes:
        raise ConfigError(f"eval dataset {info.name} has {info.num_classes} classes but the memory bank "
                          f"has {bank.num_classes}")
    if label_transfer is None:  # given: an index built already over `bank` (tools/sweep_retrieval.py)
        with timed(timings, "build_index_s"):
            label_transfer = LabelTransfer.from_options(bank, retrieval, transfer)
    rank, world = rank_and_world()
    part = torch.utils.data.Subset(eval_set, range(rank, len(eval_set), world))
    loader = torch.utils.data.DataLoader(part, batch_size=data.batch_size, num_workers=data.num_workers,
                                         collate_fn=collate)
    grid = extractor.encoder.grid_size(*input_size)

    def queries():
        for batch in loader:
            targets = batch["original_mask"] if original else list(batch["mask"])
            yield QueryBatch(grid, [tuple(t.shape) for t in targets], images=batch["image"], targets=targets,
                             keys=batch["path"])

    if per_image and world > 1:
        raise ConfigError("per-image confusion matrices are written by single-process runs only")
    cm = ConfusionMatrix(info.num_classes, ignore_index=info.ignore_index)
    keys, matrices = [], []
    with timed(timings, "evaluate_s"), worker_errors_unwrapped(), \
            tqdm(total=len(part), desc="evaluate", unit="img", disable=rank != 0) as progress:
        for prediction in predict(queries(), label_transfer, extractor, ignore_index=info.ignore_index,
                                  class_chunk=transfer.class_chunk, device=device, non_finite=non_finite,
                                  timings=timings):
            matrix = prediction.confusions[label_transfer.setting]
            cm.matrix += matrix
            if per_image:
                keys.append(str(prediction.key))
                matrices.append(matrix.numpy())
            progress.update()
    cm.all_reduce()
    summary = metric_summary(cm, info.class_names, info.ignore_index)
    summary["num_eval_images"] = len(eval_set)
    summary["index"] = label_transfer.index.options()  # the backend `exact` resolved to, and its settings
    summary["eval_images_per_s"] = len(eval_set) / max(timings["evaluate_s"], 1e-9)
    if per_image:
        summary["per_image_keys"] = keys
        summary["per_image_confusions"] = np.stack(matrices) if matrices else np.zeros((0, *cm.matrix.shape), np.int64)
    return summary


def bank_summary(bank: MemoryBank) -> dict[str, Any]:
    """Size facts of a bank for results files."""
    return {"rows": bank.count, "dim": bank.dim, "num_classes": bank.num_classes,
            "patches_per_image": bank.manifest.get("patches_per_image"),
            "num_images": bank.manifest.get("num_images"),
            "bytes": int(sum(b.nbytes for b in bank.feature_blocks) + sum(b.nbytes for b in bank.label_blocks))}


def _evaluate(encoder: Encoder, train_data: SegmentationDataset, eval_data: SegmentationDataset, *,
              input_size: Any, memory: MemoryOptions, features: FeatureOptions, retrieval: RetrievalOptions,
              transfer: TransferOptions, data: DataOptions, device: torch.device, seed: int,
              manifest_extra: dict | None, timings: dict[str, float], per_image: bool = False) -> dict[str, Any]:
    """`evaluate` once its options are checked and its device resolved."""
    start = time.perf_counter()
    encoder = encoder.to(device)
    size = encoder.input_size(input_size)
    bank, extractor = build_memory(encoder, train_data, input_size=size, features=features, memory=memory,
                                   data=data, device=device, seed=seed, timings=timings,
                                   manifest_extra=manifest_extra)
    summary = evaluate_bank(extractor, bank, eval_data, input_size=size, retrieval=retrieval, transfer=transfer,
                            data=data, device=device, timings=timings, non_finite=features.non_finite,
                            per_image=per_image)
    timings["total_s"] = time.perf_counter() - start
    return {**summary, "memory": bank_summary(bank), "features": extractor.manifest(), "timings": timings}


# --------------------------------------------------------------------------- the typed entry point


def evaluate(encoder: Any, train_data: SegmentationDataset, eval_data: SegmentationDataset, *,
             input_size: Any = None, memory: MemoryOptions | None = None, features: FeatureOptions | None = None,
             retrieval: RetrievalOptions | None = None, transfer: TransferOptions | None = None,
             data: DataOptions | None = None, device: str = "auto", seed: int = 0,
             manifest_extra: dict | None = None, per_image: bool = False) -> dict[str, Any]:
    """Hummingbird evaluation of `encoder` (an Encoder or any module `create_encoder` takes).

    The memory bank is filled from `train_data` and `eval_data` is segmented and scored; both are
    segmentation datasets (`build_dataset`), transforms are set here (`data`: normalisation, scoring
    resolution, batch size, workers). `input_size` is (H, W), an int or 'HxW' (default 32 x 32
    patches). Returns the metric summary (`miou`, `miou_reference`, `per_class_iou`, ...) with the
    bank's size (`memory`), the feature manifest and `timings`; `per_image` adds each image's confusion
    matrix (`per_image_keys`, `per_image_confusions` (N, C, C)) for paired comparisons (`eval.bootstrap`).
    """
    problem = check_device(device) if isinstance(device, str) else None
    if problem:
        raise ConfigError(f"device={device!r}: {problem}")
    retrieval = retrieval or RetrievalOptions()
    check_index_options(retrieval.backend, retrieval.options)
    return _evaluate(create_encoder(encoder), train_data, eval_data, input_size=input_size,
                     memory=memory or MemoryOptions(), features=features or FeatureOptions(), retrieval=retrieval,
                     transfer=transfer or TransferOptions(), data=data or DataOptions(),
                     device=resolve_device(device), seed=seed, manifest_extra=manifest_extra, timings={},
                     per_image=per_image)


# --------------------------------------------------------------------------- open-hummingbird-eval's signature


def hbird_evaluation(model: Any, d_model: int, patch_size: int, dataset_name: str, data_dir: str,
                     batch_size: int = 64, input_size: int = 224, augmentation_epoch: int = 1,
                     device: str = "cpu", return_knn_details: bool = False, n_neighbours: int = 30,
                     nn_method: str = "scann", nn_params: dict[str, Any] | None = None,
                     ftr_extr_fn: Callable | None = None, memory_size: int | None = None, num_workers: int = 8,
                     ignore_index: int = 255, train_fs_path: str | None = None, val_fs_path: str | None = None,
                     **options: Any) -> float | tuple[float, dict[str, Any]]:
    """open-hummingbird-eval's `hbird_evaluation` (same argument names and meanings) on this toolkit.

    Returns the mIoU in the public code's mode (Hungarian matching, mean over all classes:
    `miou_reference`), or (mIoU, details) with `return_knn_details`, details being the full
    results of `evaluate` (including the standard `miou`). `dataset_name` is 'voc', 'ade20k',
    'cityscapes', 'coco-stuff', 'coco-thing' or any dataset kind (splits `train`/`val`), optionally
    with '*<fraction>' for a seeded fraction of the memory split. `nn_method` 'scann' falls back to
    exact search when ScaNN is not installed. Keywords of `evaluate` (features=, transfer=,
    normalize=, seed=, ...) and `train_split=`/`eval_split=` pass through.
    """
    encoder = (create_encoder(model, feature_fn=ftr_extr_fn, patch_size=patch_size, embed_dim=d_model)
               if ftr_extr_fn is not None else create_encoder(model))
    if (encoder.patch_size, encoder.embed_dim) != (patch_size, d_model):
        raise ConfigError(f"the model has patch size {encoder.patch_size} and dimension {encoder.embed_dim}, "
                          f"not patch_size={patch_size}, d_model={d_model}")
    name, _, fraction = dataset_name.partition("*")
    kind, train_split, eval_split = OHE_DATASETS.get(name, (name, "train", "val"))
    train_split, eval_split = options.pop("train_split", train_split), options.pop("eval_split", eval_split)
    train_data = build_dataset(kind, data_dir, train_split, file_set=train_fs_path).subset(
        float(fraction) if fraction else None, options.get("seed", 0))
    eval_data = build_dataset(kind, data_dir, eval_split, file_set=val_fs_path)
    if ignore_index != 255 and ignore_index != eval_data.info.ignore_index:
        eval_data.info = dataclasses.replace(eval_data.info, ignore_index=ignore_index)
    memory = dataclasses.replace(options.pop("memory", None) or MemoryOptions(), size=memory_size,
                                 augmentation_epochs=augmentation_epoch)
    backend = _ohe_backend(nn_method)
    params = dict(nn_params or {}) if backend == nn_method else {}  # the exact fallback takes no ScaNN parameters
    if backend == "scann":
        params = {OHE_SCANN_PARAMS.get(key, key): value for key, value in params.items()}
    retrieval = RetrievalOptions(backend=backend, k=n_neighbours, options=params)
    data = DataOptions(batch_size=batch_size, num_workers=num_workers,
                       **{key: options.pop(key) for key in ("normalize", "eval_resolution") if key in options})
    results = evaluate(encoder, train_data, eval_data, input_size=input_size, memory=memory, retrieval=retrieval,
                       data=data, device=device, **options)
    return (results["miou_reference"], results) if return_knn_details else results["miou_reference"]


def _ohe_backend(nn_method: str) -> str:
    """Our retrieval backend for an open-hummingbird-eval `nn_method` ('scann' needs the optional package)."""
    if nn_method == "scann" and importlib.util.find_spec("scann") is None:
        log.warning("nn_method='scann' but ScaNN is not installed: using exact search (backend torch)")
        return "torch"
    return nn_method


# --------------------------------------------------------------------------- the command line's runs


def config_dataset(config: HbirdConfig, which: str) -> SegmentationDataset:
    """The memory ('train') or evaluation ('eval') dataset of `config.data`, with its seeded subset when set."""
    data = config.data
    if data.root is None:
        raise ConfigError("data.root is not set; pass data.root=DIR")
    dataset = build_dataset(data.kind, data.root, getattr(data, f"{which}_split"),
                            file_set=getattr(data, f"{which}_file_set"))
    size = data.subset if which == "train" else data.eval_subset
    return dataset.subset(size, subset_seed(data.subset_seed, config.seed))


def config_manifest(config: HbirdConfig) -> dict:
    """What a bank built from `config` records besides its features: the data and the model it came from
    (a bank from `hbfungi build-memory` reopens with `segment --memory` without naming the weights again)."""
    return {"data": data_manifest(config), "model": {**config.model.to_dict(), "normalize": config.data.normalize,
                                                         "seed": config.seed}}


def data_manifest(config: HbirdConfig) -> dict:
    """What in `data` defines the memory images (recorded in the bank manifest)."""
    data = config.data
    return {"kind": data.kind, "root": str(Path(data.root).resolve()), "split": data.train_split,
            "file_set": data.train_file_set,
            "subset": data.subset, "subset_seed": subset_seed(data.subset_seed, config.seed),
            "normalize": data.normalize}


def check_run_paths(config: HbirdConfig, out: str | Path | None, per_image: str | Path | None = None) -> None:
    """Before any model loads: inputs exist, the results files (`out`, `per_image`) and a bank to build can be
    written, and no output is, lies inside or contains an input (data root, file sets, weights, an existing bank)."""
    data, bank = config.data, config.memory.path
    inputs = preflight({"data.root": (data.root, "dir"), "data.train_file_set": (data.train_file_set, "file"),
                        "data.eval_file_set": (data.eval_file_set, "file"),
                        "model.weights": (config.model.weights, "file")},
                       {"--out": (out, "file"), "--per-image": (per_image, "file")})
    check_no_overlap({"--out": out, "--per-image": per_image}, {"memory.path": bank})
    if bank is not None and Path(bank).exists():
        read_manifest(bank)  # a damaged or unfinished bank is named before any model loads
    elif bank is not None:
        preflight({}, {"memory.path": (bank, "dir")})
        check_no_overlap({"memory.path": bank, "memory.path (unfinished build)": partial_path(bank)}, inputs)


def prepare_run(config: HbirdConfig, out: str | Path | None, timings: dict[str, float],
             per_image: str | Path | None = None) -> tuple[SegmentationDataset, Encoder, torch.device]:
    """Checks before any work (paths, index options), then the memory dataset and the encoder on its device."""
    check_index_options(config.retrieval.backend, config.retrieval.options)
    check_run_paths(config, out, per_image)
    train = config_dataset(config, "train")
    device, model = resolve_device(config.device), config.model
    with timed(timings, "load_backbone_s"):
        encoder = create_encoder(model.name, weights=model.weights, pretrained=model.pretrained, device=device,
                                 seed=config.seed)
    return train, encoder, device


def run_hbird(config: HbirdConfig, out: str | Path | None = None, per_image: str | Path | None = None) -> dict:
    """`hbfungi hbird`: the evaluation the config describes, with the config and versions recorded
    (`out`, the results file the caller writes, and `per_image`, a file of per-image matrices the caller writes,
    are checked with the other paths before any work)."""
    timings: dict[str, float] = {}
    train, encoder, device = prepare_run(config, out, timings, per_image)
    results = _evaluate(encoder, train, config_dataset(config, "eval"), input_size=config.model.input_size,
                        memory=config.memory, features=config.features, retrieval=config.retrieval,
                        transfer=config.transfer, data=config.data, device=device, seed=config.seed,
                        manifest_extra=config_manifest(config), timings=timings, per_image=per_image is not None)
    return {**results, "config": config.to_dict(), "versions": versions()}


def run_build_memory(config: HbirdConfig, out: str | Path | None = None) -> dict:
    """`hbfungi build-memory`: build the bank at memory.path and return a small report (`out` checked first)."""
    path = config.memory.path
    if path is None:
        raise ConfigError("memory.path is not set; pass memory.path=DIR to save the bank")
    if Path(path).exists():
        raise ConfigError(f"memory.path {path} already exists; remove it or choose another path")
    timings: dict[str, float] = {}
    train, encoder, device = prepare_run(config, out, timings)
    bank, extractor = build_memory(encoder, train, input_size=encoder.input_size(config.model.input_size),
                                   features=config.features, memory=config.memory, data=config.data, device=device,
                                   seed=config.seed, timings=timings, manifest_extra=config_manifest(config))
    return {"memory": bank_summary(bank), "features": extractor.manifest(), "path": path,
            "config": config.to_dict(), "timings": timings, "versions": versions()}


def run_evaluate(config: HbirdConfig, out: str | Path | None = None, per_image: str | Path | None = None) -> dict:
    """`hbfungi evaluate`: evaluate with the existing bank at memory.path (refused unless it records this config)."""
    path = config.memory.path
    if path is None or not Path(path).exists():
        raise ConfigError(f"memory.path {path!r} does not hold a memory bank; run build-memory first")
    return run_hbird(config, out, per_image)

"""The Hummingbird protocol end to end: build a memory bank, evaluate retrieval segmentation."""

from __future__ import annotations

import logging
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from hummingbird_fungi import __version__
from hummingbird_fungi.models.backbones import Backbone, load_backbone
from hummingbird_fungi.config.loader import input_size
from hummingbird_fungi.data.segmentation import SegmentationDataset, build_dataset, collate
from hummingbird_fungi.distributed import rank_and_world
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.features import PatchFeatures, build_patch_features
from hummingbird_fungi.features.embeddings import EmbeddingFeatures
from hummingbird_fungi.retrieval.transfer import LabelTransfer, predict_masks
from hummingbird_fungi.memory.bank import BankSpec, MemoryBank, build_memory_bank
from hummingbird_fungi.eval.metrics import ConfusionMatrix, summarize
from hummingbird_fungi.data.transforms import EvalTransform, TrainTransform

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed torch's global RNG (per-image randomness is seeded separately, per image)."""
    torch.manual_seed(seed)


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall-clock seconds of the block to timings[name]."""
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def make_backbone(config: dict, device: torch.device) -> Backbone:
    """The backbone named in `model`, with hub or local weights."""
    model = config["model"]
    return load_backbone(model["name"], weights=model["weights"], pretrained=model["pretrained"], device=device)


def make_dataset(config: dict, split_key: str, train: bool) -> SegmentationDataset:
    """The train (memory) or eval split of `data`, with its transform."""
    data = config["data"]
    if data["root"] is None:
        raise ConfigError("data.root is not set; pass data.root=DIR")
    size = input_size(config["model"]["input_size"])
    split = data[f"{split_key}_split"]
    file_set = data[f"{split_key}_file_set"]
    memory = config["memory"]
    if train:
        transform = TrainTransform(size, normalize=data["normalize"], jitter=memory["augment"],
                                   crop=memory["augment"])
    else:
        transform = EvalTransform(size, normalize=data["normalize"])
    dataset = build_dataset(data["kind"], data["root"], split, file_set=file_set, transform=transform,
                            seed=config["seed"],
                            keep_original_mask=(not train and data["eval_resolution"] == "original"))
    limit = data[f"max_{split_key}_images"]
    if limit is not None and limit < len(dataset):
        dataset.samples = dataset.samples[:limit]
    return dataset


def bank_spec(config: dict, dataset: SegmentationDataset, section: dict | None = None) -> BankSpec:
    """BankSpec from the `memory` section (or a support-bank section overriding size/epochs)."""
    memory = config["memory"]
    void = memory["void"]
    if void not in ("auto", "background", "ignore"):
        raise ConfigError(f"memory.void must be auto, background or ignore, got {void!r}")
    section = section or {}
    return BankSpec(
        memory_size=section.get("size", memory["size"]),
        epochs=section.get("augmentation_epochs", memory["augmentation_epochs"]),
        sampling=memory["sampling"],
        void_to_background=dataset.info.void_to_background if void == "auto" else void == "background",
        dtype=memory["dtype"], label_dtype=memory["label_dtype"], shard_images=memory["shard_images"],
        seed=config["seed"])


def data_manifest(config: dict) -> dict:
    """What in `data` defines the memory images (recorded in the bank manifest)."""
    data = config["data"]
    return {"kind": data["kind"], "root": str(data["root"]), "split": data["train_split"],
            "file_set": data["train_file_set"], "max_images": data["max_train_images"],
            "normalize": data["normalize"], "augment": config["memory"]["augment"]}


def make_extractor(config: dict, backbone: Backbone, train_set: SegmentationDataset, device: torch.device,
                   timings: dict[str, float]) -> PatchFeatures:
    """The patch feature extractor of `features`, with its support set built if it needs one."""
    features = config["features"]
    options = features["fungi"] if features["kind"] == "fungi" else {}
    extractor = build_patch_features(features["kind"], backbone, options)
    if extractor.needs_support:
        with timed(timings, "support_bank_s"):
            spec = bank_spec(config, train_set, features["support"])
            support = build_memory_bank(train_set, EmbeddingFeatures(backbone), spec,
                                        batch_size=config["data"]["batch_size"], device=device,
                                        num_workers=config["data"]["num_workers"], distributed=False)
            extractor.set_support(torch.from_numpy(np.concatenate(support.feature_blocks)).float(),
                                  image_ids=support.row_images())
    return extractor


def build_memory(config: dict, backbone: Backbone | None = None, timings: dict | None = None,
                 path: str | Path | None = None) -> tuple[MemoryBank, PatchFeatures]:
    """Build (or resume) the memory bank described by `config`; saved when a path is given."""
    timings = {} if timings is None else timings
    device = resolve_device(config["device"])
    seed_everything(config["seed"])
    with timed(timings, "load_backbone_s"):
        backbone = backbone or make_backbone(config, device)
    train_set = make_dataset(config, "train", train=True)
    extractor = make_extractor(config, backbone, train_set, device, timings)
    with timed(timings, "build_memory_s"):
        bank = build_memory_bank(train_set, extractor, bank_spec(config, train_set), path=path,
                                 manifest_extra={"data": data_manifest(config)},
                                 batch_size=config["data"]["batch_size"],
                                 num_workers=config["data"]["num_workers"], device=device)
    return bank, extractor


def make_transfer(config: dict, bank: MemoryBank) -> LabelTransfer:
    """The label transfer of the `retrieval` and `transfer` sections over `bank`."""
    retrieval, transfer = config["retrieval"], config["transfer"]
    return LabelTransfer.from_bank(bank, retrieval["backend"], k=retrieval["k"], temperature=transfer["temperature"],
                                   rescore=transfer["rescore"], rerank=transfer["rerank"], **retrieval["options"])


def metric_summary(cm: ConfusionMatrix, class_names: Sequence[str], ignore_index: int | None) -> dict:
    """mIoU (both modes) and per-class IoU of `cm`, leaving out an ignore index that is a class id (ADE20K's 0)."""
    exclude = ignore_index if ignore_index is not None and ignore_index < len(class_names) else None
    return summarize(cm, class_names, exclude=exclude)


def evaluate_bank(config: dict, bank: MemoryBank, extractor: PatchFeatures, timings: dict) -> dict:
    """Segment the eval split with `bank` and return the metric summary."""
    device = resolve_device(config["device"])
    eval_set = make_dataset(config, "eval", train=False)
    if list(input_size(config["model"]["input_size"])) != bank.manifest["input_size"]:
        log.warning("evaluating at input size %s with a bank built at %s",
                    input_size(config["model"]["input_size"]), bank.manifest["input_size"])
    info = eval_set.info
    if info.num_classes != bank.num_classes:
        raise ConfigError(f"eval dataset {info.name} has {info.num_classes} classes but the memory bank "
                          f"has {bank.num_classes}")
    with timed(timings, "build_index_s"):
        transfer = make_transfer(config, bank)
    rank, world = rank_and_world()
    part = torch.utils.data.Subset(eval_set, range(rank, len(eval_set), world))
    loader = torch.utils.data.DataLoader(part, batch_size=config["data"]["batch_size"],
                                         num_workers=config["data"]["num_workers"], collate_fn=collate)
    cm = ConfusionMatrix(info.num_classes, ignore_index=info.ignore_index)
    original = config["data"]["eval_resolution"] == "original"
    if config["data"]["eval_resolution"] not in ("input", "original"):
        raise ConfigError(f"data.eval_resolution must be input or original, "
                          f"got {config['data']['eval_resolution']!r}")
    with timed(timings, "evaluate_s"):
        for batch in tqdm(loader, desc="evaluate", unit="batch", disable=rank != 0):
            images = batch["image"].to(device)
            grid = extractor.backbone.grid_size(*images.shape[-2:])
            targets = batch["original_mask"] if original else list(batch["mask"])
            preds = predict_masks(transfer, extractor(images), grid, [tuple(t.shape) for t in targets],
                                  config["transfer"]["class_chunk"])
            for pred, target in zip(preds, targets):
                cm.update(pred, target)
    cm.all_reduce()
    summary = metric_summary(cm, info.class_names, info.ignore_index)
    summary["num_eval_images"] = len(eval_set)
    summary["eval_images_per_s"] = len(eval_set) / max(timings["evaluate_s"], 1e-9)
    return summary


def versions() -> dict[str, str]:
    """Library versions for results files."""
    import faiss
    import timm
    import torchvision
    return {"hummingbird_fungi": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "torchvision": torchvision.__version__, "faiss": faiss.__version__,
            "python": platform.python_version()}


def bank_summary(bank: MemoryBank) -> dict[str, Any]:
    """Size facts of a bank for results files."""
    return {"rows": bank.count, "dim": bank.dim, "num_classes": bank.num_classes,
            "patches_per_image": bank.manifest.get("patches_per_image"),
            "num_images": bank.manifest.get("num_images"),
            "bytes": int(sum(b.nbytes for b in bank.feature_blocks) + sum(b.nbytes for b in bank.label_blocks))}


def load_or_build(config: dict, timings: dict) -> tuple[MemoryBank, PatchFeatures]:
    """Reuse the bank at memory.path when it exists (refusing a mismatched one), else build it."""
    path = config["memory"]["path"]
    if path is not None and Path(path).exists():
        device = resolve_device(config["device"])
        with timed(timings, "load_backbone_s"):
            backbone = make_backbone(config, device)
        train_set = make_dataset(config, "train", train=True)
        extractor = make_extractor(config, backbone, train_set, device, timings)
        with timed(timings, "load_memory_s"):
            bank = MemoryBank.load(path, expect_features=extractor.manifest())
        log.info("loaded memory bank %s (%d rows, built from %s)", path, bank.count, bank.manifest.get("dataset"))
        return bank, extractor
    return build_memory(config, timings=timings, path=path)


def run_hbird(config: dict) -> dict:
    """Build (or load) the memory bank, evaluate, and return the results dictionary."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    bank, extractor = load_or_build(config, timings)
    summary = evaluate_bank(config, bank, extractor, timings)
    timings["total_s"] = time.perf_counter() - start
    return {**summary, "memory": bank_summary(bank), "features": extractor.manifest(),
            "config": config, "timings": timings, "versions": versions()}


def run_build_memory(config: dict) -> dict:
    """Build the memory bank at memory.path and return a small report."""
    if config["memory"]["path"] is None:
        raise ConfigError("memory.path is not set; pass memory.path=DIR to save the bank")
    timings: dict[str, float] = {}
    bank, extractor = build_memory(config, timings=timings, path=config["memory"]["path"])
    return {"memory": bank_summary(bank), "features": extractor.manifest(), "path": config["memory"]["path"],
            "config": config, "timings": timings, "versions": versions()}


def run_evaluate(config: dict) -> dict:
    """Evaluate with an existing bank at memory.path."""
    path = config["memory"]["path"]
    if path is None or not Path(path).exists():
        raise ConfigError(f"memory.path {path!r} does not hold a memory bank; run build-memory first")
    return run_hbird(config)

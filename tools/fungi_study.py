"""FUNGI study: a grid of patch-feature variants scored against the embeddings with paired bootstrap intervals.

Two protocols:
* a segmentation preset (`--config camvid_dinov2_vits14 data.root=... model.weights=...`): the train
  split is the memory (every patch, and label-aware banks of --memory-size rows), the eval split is
  scored; one confusion matrix per eval image; intervals resample images.
* DAVIS first-frame (`--davis ROOT --weights FILE`): per sequence the first frame's patches are the
  memory and every --frame-step-th later frame is scored at its own size; the score is the mean
  over sequences of each sequence's mean foreground IoU (J); intervals resample sequences.

Each --grad NAME=KEY=VALUE,... is one FUNGI extraction (features.fungi options, e.g. layer=blocks.-1.mlp.fc2
or objective=kl; without layer= the backbone's patch default, attn.qkv on ViTs); its token embeddings
and projected gradients are extracted once per image and cached in --cache. Each --row is a composition
of them (eval/study.py: 'NAME' = embeddings, or 'NAME:grads=a+b,w=0.5,dims=96,pca=256,whiten') scored
at every --k and --temperature from one search.
Every row is compared with the row named 'embeddings' at the first --k and --temperature on the same
memory, over the same resamples. Prints the tables and writes them as JSON.

    python tools/fungi_study.py --config camvid_dinov2_vits14 --cache runs/study_cache --out runs/study.json \
        --grad proj=layer=blocks.-1.attn.proj --grad fc2=layer=blocks.-1.mlp.fc2 \
        --row embeddings --row proj:grads=proj --row fc2:grads=fc2 --memory-size 102400 --memory-size none \
        data.root=../shared/assets/camvid model.weights=dinov2_vits14_imgfocus.pth
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from hummingbird_fungi.config.loader import load_config, parse_override
from hummingbird_fungi.config.schema import FungiOptions, parse_size
from hummingbird_fungi.data.segmentation import collate
from hummingbird_fungi.data.transforms import EvalTransform, read_image, read_mask
from hummingbird_fungi.eval.bootstrap import paired_bootstrap, paired_bootstrap_means, resample_indices
from hummingbird_fungi.eval.hbird import config_dataset, config_encoder, input_size_for, memory_transform
from hummingbird_fungi.eval.study import Pca, compose, image_confusions, parse_composition, search, transfer_probs
from hummingbird_fungi.features.embeddings import EmbeddingFeatures
from hummingbird_fungi.features.fungi_patch import FungiPatchFeatures
from hummingbird_fungi.fileio import make_dirs, save_npy_atomic, write_atomic, write_json
from hummingbird_fungi.memory.labels import patches_per_image, patchify_labels, sample_patches, soft_labels
from hummingbird_fungi.models.backbones import load_backbone
from hummingbird_fungi.runtime import generator
from hummingbird_fungi.segment.video import jaccard

log = logging.getLogger("fungi_study")


# --------------------------------------------------------------------------- extraction and its cache


def grad_options(text: str) -> tuple[str, dict[str, Any]]:
    """'fc2=layer=blocks.-1.mlp.fc2,objective=kl' -> ('fc2', checked FungiOptions as a dict)."""
    name, _, spec = text.partition("=")
    overrides = {keys[0]: value for keys, value in (parse_override(item) for item in spec.split(",") if item)}
    return name, FungiOptions.from_mapping(overrides).to_dict()


def extract(encoder, batches: Iterator[torch.Tensor], grads: dict[str, dict], device: torch.device,
            desc: str) -> dict[str, np.ndarray]:
    """Tokens and each gradient's projection for every image of `batches`: {name: (n, N, dim) float16}."""
    parts: dict[str, list[np.ndarray]] = {"tokens": [], **{name: [] for name in grads}}
    extractors = {name: FungiPatchFeatures(encoder, FungiOptions.from_mapping(opts)) for name, opts in grads.items()}
    plain = EmbeddingFeatures(encoder)
    for images in tqdm(batches, desc=desc, unit="batch"):
        images = images.to(device)
        tokens = None
        for name, extractor in extractors.items():
            tokens, phi = extractor.parts(images)
            parts[name].append(phi.cpu().numpy().astype(np.float16))
        tokens = plain(images) if tokens is None else tokens
        parts["tokens"].append(tokens.cpu().numpy().astype(np.float16))
    return {name: np.concatenate(blocks) for name, blocks in parts.items()}


class PartCache:
    """Arrays of one split in `folder`, each stored with the options that made it; stale ones are recomputed."""

    def __init__(self, folder: Path) -> None:
        self.folder = make_dirs(folder)
        self.meta_path = folder / "meta.json"
        self.meta = json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else {}

    def missing(self, wanted: dict[str, Any]) -> list[str]:
        """Names whose array is absent or was made with other options."""
        return [name for name, opts in wanted.items()
                if self.meta.get(name) != opts or not (self.folder / f"{name}.npy").is_file()]

    def put(self, name: str, array: np.ndarray, opts: Any) -> None:
        save_npy_atomic(self.folder / f"{name}.npy", array)
        self.meta[name] = opts
        write_atomic(self.meta_path, json.dumps(self.meta, indent=1).encode())

    def get(self, name: str) -> np.ndarray:
        return np.load(self.folder / f"{name}.npy", mmap_mode="r")


def fill(cache: PartCache, encoder, batches, grads: dict[str, dict], device, desc: str, key: dict[str, Any]) -> None:
    """Extract whatever `cache` lacks for this encoder and input size (`key`): tokens, missing gradients."""
    keyed = {name: {**opts, **key} for name, opts in grads.items()}
    todo = {name: grads[name] for name in cache.missing(keyed)}
    if todo or cache.missing({"tokens": key}):
        arrays = extract(encoder, batches(), todo, device, desc)
        for name, array in arrays.items():
            cache.put(name, array, key if name == "tokens" else keyed[name])


# --------------------------------------------------------------------------- protocols


def segmentation_data(args, encoder, grads, device) -> dict[str, Any]:
    """Cached parts, label counts and eval targets of a segmentation preset."""
    config = args.loaded
    size = input_size_for(encoder, config.model.input_size)
    train, evaluation = config_dataset(config, "train"), config_dataset(config, "eval")
    train = train.with_transform(memory_transform(size, config.data.normalize, config.memory))
    evaluation = evaluation.with_transform(EvalTransform(size, normalize=config.data.normalize))
    extra = {"encoder": encoder.name + ":" + encoder.weights_id, "input_size": list(size)}
    splits = {}
    for split, dataset in (("train", train), ("eval", evaluation)):
        cache = PartCache(args.cache / split)

        def batches(dataset=dataset) -> Iterator[torch.Tensor]:
            loader = torch.utils.data.DataLoader(dataset, batch_size=config.data.batch_size, collate_fn=collate,
                                                 num_workers=config.data.num_workers)
            return (batch["image"] for batch in loader)

        fill(cache, encoder, batches, grads, device, f"{split} features", extra)
        if cache.missing({"masks": extra}):
            masks = np.stack([dataset[i]["mask"].numpy() for i in range(len(dataset))]).astype(np.int16)
            cache.put("masks", masks, extra)
        splits[split] = cache
    info = evaluation.info
    void = config.memory.void
    counts = patchify_labels(torch.from_numpy(splits["train"].get("masks").astype(np.int64)), encoder.patch_size,
                             info.num_classes, info.void_to_background if void == "auto" else void == "background")
    return {"kind": "images", "train": splits["train"], "eval": splits["eval"], "counts": counts,
            "grid": encoder.grid_size(*size), "num_classes": info.num_classes, "ignore_index": info.ignore_index,
            "targets": splits["eval"].get("masks"), "seed": config.seed, "input_size": size}


def davis_data(args, encoder, grads, device) -> dict[str, Any]:
    """Per sequence: cached parts of the first frame (memory) and the scored frames, with their masks."""
    size = parse_size(args.input_size)
    transform = EvalTransform(size, normalize="imagenet")
    extra = {"encoder": encoder.name + ":" + encoder.weights_id, "input_size": list(size)}
    sequences = {}
    names = args.sequence or sorted(p.name for p in (args.davis / "JPEGImages").iterdir() if p.is_dir())
    for name in names:
        frames = sorted((args.davis / "JPEGImages" / name).glob("*.jpg"))
        chosen = [frames[0]] + frames[args.frame_step::args.frame_step]
        cache = PartCache(args.cache / name)

        def batches(chosen=chosen) -> Iterator[torch.Tensor]:
            for start in range(0, len(chosen), 4):
                yield torch.stack([transform(read_image(p))[0] for p in chosen[start:start + 4]])

        fill(cache, encoder, batches, grads, device, name, extra)
        masks = [read_mask(args.davis / "Annotations" / name / f"{p.stem}.png") for p in chosen]
        counts = patchify_labels(transform(read_image(chosen[0]), masks[0])[1][None].long(), encoder.patch_size, 2,
                                 False)
        sequences[name] = {"cache": cache, "counts": counts, "targets": masks[1:]}
    return {"kind": "davis", "sequences": sequences, "grid": encoder.grid_size(*size), "num_classes": 2,
            "ignore_index": 255, "input_size": size}


# --------------------------------------------------------------------------- scoring


def features_of(cache: PartCache, comp, rows: np.ndarray | slice = slice(None)) -> torch.Tensor:
    """The composition's unit features (n, D) of the cached images' patches `rows` (flattened index)."""
    def read(name: str) -> torch.Tensor:
        array = cache.get(name)
        return torch.from_numpy(np.array(array.reshape(-1, array.shape[-1])[rows]))  # a copy, out of the memory map

    return compose(read("tokens"), [read(g) for g in comp.grads], comp)


def neighbours(memory: torch.Tensor, queries: torch.Tensor, comp, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (similarities, ids) of the queries among the memory rows, after the composition's PCA if any
    (fitted on the memory; at most as many components as memory rows)."""
    if comp.pca:
        pca = Pca(memory, min(comp.pca, len(memory)), comp.whiten)
        memory, queries = pca(memory), pca(queries)
    return search(queries, memory, k)


def score_images(data: dict, comp, memory_rows: np.ndarray | slice, ks: list[int], temps: list[float]) -> dict:
    """{(k, T): (N, C, C) per-image matrices} of one composition against the chosen memory rows."""
    labels = soft_labels(data["counts"].reshape(-1, data["num_classes"])[memory_rows])
    sims, ids = neighbours(features_of(data["train"], comp, memory_rows), features_of(data["eval"], comp), comp,
                           max(ks))
    return {(k, t): image_confusions(transfer_probs(sims, ids, labels, k, t), data["grid"], data["targets"],
                                     data["num_classes"], data["ignore_index"]) for k in ks for t in temps}


def score_davis(data: dict, comp, ks: list[int], temps: list[float]) -> dict:
    """{(k, T): (S,) per-sequence mean J} of one composition, each sequence against its first frame."""
    per_sequence: dict[tuple, list[float]] = {(k, t): [] for k in ks for t in temps}
    for sequence in data["sequences"].values():
        feats = features_of(sequence["cache"], comp)
        per_image = data["grid"][0] * data["grid"][1]
        sims, ids = neighbours(feats[:per_image], feats[per_image:], comp, max(ks))  # memory: the first frame
        labels = soft_labels(sequence["counts"].reshape(-1, 2))
        for k, t in per_sequence:
            cms = image_confusions(transfer_probs(sims, ids, labels, k, t), data["grid"], sequence["targets"], 2, 255)
            per_sequence[(k, t)].append(float(np.mean([jaccard(cm) for cm in cms])))
    return {key: np.array(values) for key, values in per_sequence.items()}


def label_aware_rows(data: dict, size: int | None) -> tuple[np.ndarray | slice, int]:
    """Flat memory-row ids of a bank of `size` rows drawn by the builder's label-aware rule (seed + 1, epoch 0)."""
    counts = data["counts"]  # (n, N, C)
    n_img = patches_per_image(size, counts.shape[0], 1, counts.shape[1])
    if n_img == counts.shape[1]:
        return slice(None), counts.shape[0] * counts.shape[1]
    keep = [sample_patches(counts[i], n_img, "label_aware", generator(data["seed"] + 1, 0, i)).numpy()
            + i * counts.shape[1] for i in range(counts.shape[0])]
    rows = np.concatenate(keep)
    return rows, len(rows)


def main() -> None:
    """Extract, score every row at every k/T and memory size, print and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="segmentation preset name or file")
    parser.add_argument("--davis", type=Path, help="DAVIS-2016 folder (JPEGImages/, Annotations/)")
    parser.add_argument("--weights", type=Path, help="backbone weights (DAVIS; presets use model.weights)")
    parser.add_argument("--input-size", default="252x448", help="DAVIS network input HxW")
    parser.add_argument("--frame-step", type=int, default=3, help="DAVIS: score every N-th frame")
    parser.add_argument("--sequence", action="append", help="DAVIS sequences (default: all)")
    parser.add_argument("--grad", action="append", default=[], help="NAME=fungi options (repeatable)")
    parser.add_argument("--row", action="append", required=True, help="composition (repeatable)")
    parser.add_argument("--k", action="append", type=int, help="neighbours (first = the reference setting)")
    parser.add_argument("--temperature", action="append", type=float, help="softmax temperatures")
    parser.add_argument("--memory-size", action="append", help="rows of label-aware banks; 'none' = every patch")
    parser.add_argument("--full-rows", help="comma-separated rows scored on the full bank (default: all)")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="preset overrides key=value")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (args.config is None) == (args.davis is None):
        parser.error("give exactly one of --config and --davis")
    grads = dict(grad_options(text) for text in args.grad)
    rows = [parse_composition(text) for text in args.row]
    if rows[0].name != "embeddings" or rows[0].grads:
        parser.error("the first --row must be 'embeddings' (the reference of every interval)")
    unknown = sorted({g for row in rows for g in row.grads} - set(grads))
    if unknown:
        parser.error(f"rows use gradients without a --grad: {unknown}")
    ks, temps = args.k or [30], args.temperature or [0.02]
    device = torch.device("cpu")
    if args.config:
        args.loaded = load_config(args.config, args.overrides)
        encoder = config_encoder(args.loaded, device)
        data = segmentation_data(args, encoder, grads, device)
    else:
        encoder = load_backbone("dinov2_vits14", weights=args.weights, device=device)
        data = davis_data(args, encoder, grads, device)
    reference = (ks[0], temps[0])
    report: dict[str, Any] = {"protocol": data["kind"], "grads": grads, "input_size": list(data["input_size"]),
                              "reference": {"k": ks[0], "temperature": temps[0]}, "tables": []}
    metric = "mIoU" if data["kind"] == "images" else "mean J"
    if data["kind"] == "images":
        sizes = [None if s.lower() == "none" else int(s) for s in (args.memory_size or ["none"])]
        draws = resample_indices(len(data["targets"]), args.resamples, seed=0)
        full_rows = None if args.full_rows is None else set(args.full_rows.split(",")) | {"embeddings"}
        plans = [(size, [c for c in rows if size is not None or full_rows is None or c.name in full_rows])
                 for size in sizes]
    else:
        draws = resample_indices(len(data["sequences"]), args.resamples, seed=0)
        plans = [(None, rows)]
    for number, (size, comps) in enumerate(plans):
        if data["kind"] == "images":
            memory_rows, count = label_aware_rows(data, size)
            table: dict[str, Any] = {"memory_rows": count, "rows": []}
        else:
            count, table = None, {"sequences": list(data["sequences"]), "rows": []}
        report["tables"].append(table)
        scores: dict[tuple, np.ndarray] = {}  # (row, k, T) -> per-image matrices or per-sequence J
        for comp in comps:
            start = time.perf_counter()
            scored = (score_images(data, comp, memory_rows, ks, temps) if data["kind"] == "images"
                      else score_davis(data, comp, ks, temps))
            for (k, t), values in scored.items():
                scores[(comp.name, k, t)] = values
                result = compare(scores[("embeddings", *reference)], values, draws)
                table["rows"].append({"row": comp.name, "k": k, "temperature": t, "score": result["b"],
                                      **{key: result[key] for key in ("difference", "low", "high", "excludes_zero")},
                                      "seconds": time.perf_counter() - start,
                                      **({"per_sequence": values.tolist()} if values.ndim == 1 else {})})
            write_json(args.out, report)
            print_rows(table, comp.name, count, metric)
        np.savez_compressed(args.out.with_suffix(f".table{number}.npz"),
                            **{f"{name}|{k}|{t}": values for (name, k, t), values in scores.items()})
        table["tuned"] = tuned_comparisons(table, scores, draws)
        write_json(args.out, report)
    print_summary(report, metric)


def compare(a: np.ndarray, b: np.ndarray, draws: np.ndarray) -> dict[str, Any]:
    """Paired bootstrap of b against a: per-image matrices (N, C, C) or per-sequence scores (S,)."""
    if a.ndim == 3:
        result = paired_bootstrap(a, b, indices=draws)
        return {**result, "b": result["miou_b"]}
    result = paired_bootstrap_means(a, b, indices=draws)
    return {**result, "b": result["mean_b"]}


def tuned_comparisons(table: dict, scores: dict, draws: np.ndarray) -> list[dict[str, Any]]:
    """Each row at its best k/T against the embeddings at theirs (both picked on the scored set)."""
    def best(name: str) -> dict:
        return max((r for r in table["rows"] if r["row"] == name), key=lambda r: r["score"])

    base = best("embeddings")
    out = []
    for name in dict.fromkeys(r["row"] for r in table["rows"]):
        row = best(name)
        result = compare(scores[("embeddings", base["k"], base["temperature"])],
                         scores[(name, row["k"], row["temperature"])], draws)
        out.append({"row": name, "k": row["k"], "temperature": row["temperature"], "score": row["score"],
                    "embeddings_k": base["k"], "embeddings_temperature": base["temperature"],
                    **{key: result[key] for key in ("difference", "low", "high", "excludes_zero")}})
    return out


def line(row: dict) -> str:
    """Score, difference and interval of one result row."""
    return (f"{100 * row['score']:6.2f}  {100 * row['difference']:+6.2f} [{100 * row['low']:+6.2f}, "
            f"{100 * row['high']:+6.2f}]{' *' if row['excludes_zero'] else ''}")


def print_rows(table: dict, name: str, count: int | None, metric: str) -> None:
    """The lines of one row (every k and T) as they finish."""
    for row in table["rows"]:
        if row["row"] == name:
            where = "" if count is None else f"bank {count:7d} "
            print(f"{where}{name:24s} k {row['k']:3d} T {row['temperature']:.3f}  {metric} {line(row)}", flush=True)


def print_summary(report: dict, metric: str) -> None:
    """Per table: every row at the reference k/T, then each row's best k/T against the embeddings' best."""
    ref = report["reference"]
    for table in report["tables"]:
        title = f"memory rows {table['memory_rows']}" if "memory_rows" in table else "DAVIS first frame"
        print(f"\n== {title}: {metric} and its difference to the embeddings at k={ref['k']}, T={ref['temperature']}; "
              f"95% paired bootstrap interval (* excludes 0)")
        for row in table["rows"]:
            if row["k"] == ref["k"] and row["temperature"] == ref["temperature"]:
                print(f"  {row['row']:24s} {line(row)}")
        print("  each row at its best k/T against the embeddings at theirs (both picked on the scored set):")
        for row in table["tuned"]:
            print(f"  {row['row']:24s} k {row['k']:3d} T {row['temperature']:.3f}  {line(row)}")


if __name__ == "__main__":
    main()

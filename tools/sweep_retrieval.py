"""Sweep retrieval settings over a built bank: recall@k against exact search, mIoU and throughput, one row each.

Opens the bank at `memory.path` (built by `hbfungi build-memory` or `hbird` with the same config),
extracts the evaluation images' query features once (cached by image content), then for every
setting builds its index and runs the benchmark's own evaluation (`eval.hbird.evaluate_bank`) with
it: index seconds, search seconds, query side (search + cosines + vote) seconds, search queries
per second, recall@k of a seeded sample of query patches against exact search over the bank's own
rows in the setting's own feature space (the index's loss alone), mIoU and its change from the first
setting (exact by default), and the search speed-up over it. A setting is
`[pca<d>/|white[<d>]/]backend[:key=value,...]`: `pca<d>/` first fits a PCA of d axes (no whitening) on
the bank's rows and searches in that space, `white<d>/` the same whitened (`features.transform`, every
axis without d); keys are the backend's `retrieval.options`, plus `rerank` (`transfer.rerank`) and
`rescore` (`transfer.rescore`).

    python tools/sweep_retrieval.py --config camvid_dinov2_vits14 data.root=DIR model.weights=FILE \\
        memory.path=BANK --threads 1
    python tools/sweep_retrieval.py ... --settings exact faiss_ivf:nprobe=16 pca128/faiss_ivf:nprobe=32
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from bench_features import add_clock_arguments, emit_json, package_clock, set_threads
from hummingbird_fungi.config.loader import load_config, presets
from hummingbird_fungi.config.schema import HbirdConfig, RetrievalOptions, TransformOptions
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.eval.hbird import config_dataset, config_manifest, evaluate_bank, prepare_run
from hummingbird_fungi.features import PatchFeatures
from hummingbird_fungi.memory.build import build_memory, feature_transform, transformed
from hummingbird_fungi.retrieval.indexes import check_index_options
from hummingbird_fungi.retrieval.transfer import LabelTransfer

log = logging.getLogger("sweep_retrieval")

DEFAULT_SETTINGS = [
    "exact",
    "faiss_hnsw:M=32,ef_search=64", "faiss_hnsw:M=32,ef_search=128",
    "faiss_ivf:nlist=1024,nprobe=8", "faiss_ivf:nlist=1024,nprobe=32",
    "faiss_ivfpq:nlist=1024,nprobe=32,reorder=false,rerank=120",
    "faiss_ivfpq:nlist=1024,nprobe=32,reorder=false,rerank=600",
    "pca128/exact", "pca128/faiss_ivf:nlist=1024,nprobe=16", "pca64/faiss_ivf:nlist=1024,nprobe=16",
]
TRANSFER_KEYS = ("rerank", "rescore")


@dataclasses.dataclass
class Setting:
    """One retrieval setting of the sweep."""

    text: str
    backend: str
    options: dict[str, Any]
    transfer: dict[str, Any]
    transform: TransformOptions | None  # fitted on the bank's rows before the index is built


def parse_transform(text: str, prefix: str) -> TransformOptions:
    """`pca<d>` or `white[<d>]` -> the transform options; ConfigError naming the setting when malformed."""
    for name, whiten in (("white", True), ("pca", False)):
        dims = prefix[len(name):]
        if prefix.startswith(name) and (dims.isdigit() and int(dims) >= 1 or (whiten and not dims)):
            return TransformOptions(pca=True, dims=int(dims) if dims else None, whiten=whiten)
    raise ConfigError(f"setting {text!r}: expected pca<d>/ or white[<d>]/ (d >= 1) before the backend, "
                      f"got {prefix!r}/")


def parse_setting(text: str) -> Setting:
    """`[pca<d>/|white[<d>]/]backend[:key=value,...]` -> Setting; ConfigError naming the setting when malformed."""
    head, _, rest = text.partition(":")
    transform = None
    if "/" in head:
        prefix, head = head.split("/", 1)
        transform = parse_transform(text, prefix)
    values = {}
    for item in filter(None, rest.split(",")):
        key, equals, value = item.partition("=")
        if not equals:
            raise ConfigError(f"setting {text!r}: expected key=value, got {item!r}")
        values[key.strip()] = yaml.safe_load(value)
    transfer = {key: values.pop(key) for key in TRANSFER_KEYS if key in values}
    check_index_options(head, values)
    return Setting(text, head, values, transfer, transform)


class CachedFeatures(PatchFeatures):
    """Another extractor whose features are computed once per distinct batch of images (keyed by content)."""

    def __init__(self, inner: PatchFeatures) -> None:
        super().__init__(inner.encoder)
        self.inner, self.kind = inner, inner.kind
        self.cache: dict[str, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        return self.inner.dim

    def options(self) -> dict[str, Any]:
        return self.inner.options()

    def manifest(self) -> dict[str, Any]:
        return self.inner.manifest()

    def __call__(self, images: torch.Tensor, select: torch.Tensor | None = None,
                 image_ids: torch.Tensor | None = None) -> torch.Tensor:
        key = hashlib.sha1(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        if key not in self.cache:
            self.cache[key] = self.inner(images, select, image_ids).detach()  # (B, N, D)
        return self.cache[key]

    def sample_rows(self, count: int, seed: int = 0) -> torch.Tensor:
        """`count` cached query patch features drawn without replacement (seeded) -> (count', D) float32."""
        rows = torch.cat([features.reshape(-1, features.shape[-1]) for features in self.cache.values()]).float()
        return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:count]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="preset name or YAML file (as hbfungi hbird --config)")
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="settings, the first the baseline")
    parser.add_argument("--recall-queries", type=int, default=2000, help="query patches whose recall is measured")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("overrides", nargs="*", help="config overrides; memory.path=BANK is required")
    add_clock_arguments(parser, default_clock="process")
    return parser.parse_args(argv)


def load_sweep_config(args: argparse.Namespace) -> HbirdConfig:
    """The evaluation config; ConfigError unless memory.path holds a bank."""
    path = presets().get(args.config, args.config) if args.config else None
    config = load_config(path, args.overrides)
    if config.memory.path is None or not Path(config.memory.path).is_dir():
        raise ConfigError(f"memory.path={config.memory.path!r}: the sweep needs a built bank there "
                          f"(hbfungi build-memory with the same config)")
    return config


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean fraction of each row's exact top-k ids (n, k) among the found ones (n, k)."""
    return float((found[:, :, None] == exact[:, None, :]).any(-1).float().mean())


def sweep(config: HbirdConfig, settings: list[Setting], recall_queries: int) -> list[dict[str, Any]]:
    """One row per setting (the first is the baseline of the mIoU change and the speed-up)."""
    timings: dict[str, float] = {}
    train, encoder, device = prepare_run(config, None, timings)
    size = encoder.input_size(config.model.input_size)
    bank, extractor = build_memory(encoder, train, input_size=size, features=config.features, memory=config.memory,
                                   data=config.data, device=device, seed=config.seed, timings=timings,
                                   manifest_extra=config_manifest(config))
    cached = CachedFeatures(extractor)
    eval_set = config_dataset(config, "eval")
    k, rows = config.retrieval.k, []
    exact_ids: dict[str, torch.Tensor] = {}  # feature space (the transform's repr) -> exact top-k ids
    for setting in settings:
        space_bank, queries = bank, cached
        if setting.transform is not None:
            space_bank, queries = transformed(bank, cached, feature_transform(bank, setting.transform, config.seed))
        transfer_options = dataclasses.replace(config.transfer, **setting.transfer)
        start = time.perf_counter()
        label_transfer = LabelTransfer.from_bank(space_bank, setting.backend, k=k,
                                                 temperature=transfer_options.temperature,
                                                 rescore=transfer_options.rescore, rerank=transfer_options.rerank,
                                                 **setting.options)
        index_s = time.perf_counter() - start
        run_timings: dict[str, float] = {}
        summary = evaluate_bank(queries, space_bank, eval_set, input_size=size,
                                retrieval=RetrievalOptions(backend=setting.backend, k=k, options=setting.options),
                                transfer=transfer_options, data=config.data, device=device, timings=run_timings,
                                non_finite=config.features.non_finite, label_transfer=label_transfer)
        sample = cached.sample_rows(recall_queries, config.seed)  # raw query rows
        if setting.transform is not None:
            sample = queries.transform(sample)
        space = repr(setting.transform)
        if space not in exact_ids:  # exact search in the setting's own feature space
            exact_ids[space] = LabelTransfer.from_bank(space_bank, "exact", k=k).neighbours(sample)[1]
        found = label_transfer.neighbours(sample, k)[1]
        search_s, query_s = run_timings.get("search_s", 0.0), run_timings.get("vote_s", 0.0)
        row = {"setting": setting.text, "index": summary["index"], "index_s": round(index_s, 2),
               "search_s": round(search_s, 2), "query_side_s": round(query_s + run_timings.get("upsample_s", 0.0), 2),
               "search_queries_per_s": round(queries_count(cached) / max(search_s, 1e-9), 1),
               f"recall@{k}": round(recall(found, exact_ids[space]), 4), "miou": round(summary["miou"], 4)}
        baseline = rows[0] if rows else row
        row["delta_miou"] = round(row["miou"] - baseline["miou"], 4)
        row["search_speedup"] = round(baseline["search_s"] / max(row["search_s"], 1e-9), 2)
        log.info("%s", row)
        rows.append(row)
    return rows


def queries_count(cached: CachedFeatures) -> int:
    """Query patches of the evaluation set (every cached batch's B x N)."""
    return sum(features.shape[0] * features.shape[1] for features in cached.cache.values())


def table(rows: list[dict[str, Any]]) -> str:
    """The frontier as a text table."""
    keys = [key for key in rows[0] if key not in ("setting", "index")]
    width = max(len(row["setting"]) for row in rows)
    lines = [f"{'setting':<{width}}" + "".join(f"{key:>22}" for key in keys)]
    lines += [f"{row['setting']:<{width}}" + "".join(f"{row[key]:>22}" for key in keys) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the sweep; print the table and the JSON rows (and return them)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    set_threads(args.threads)
    settings = [parse_setting(text) for text in args.settings]
    config = load_sweep_config(args)
    if config.features.transform.pca and any(setting.transform for setting in settings):
        raise ConfigError("pca<d>/ and white<d>/ settings fit their own PCA on the raw rows: leave "
                          "features.transform.pca off")
    with package_clock(args.clock):
        rows = sweep(config, settings, args.recall_queries)
    print(table(rows))
    emit_json(rows, args.json)
    return rows


if __name__ == "__main__":
    main()

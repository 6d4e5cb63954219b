"""Size test of on-disk memory banks and approximate retrieval: a synthetic bank larger than RAM.

Writes a synthetic bank with the bank writer of `memory/bank.py` (fp16 unit features and fp16
soft labels, shard by shard, resumable), opens it memory-mapped, trains a `faiss_ivfpq` index
on a sample of its rows, adds it shard by shard, searches perturbed bank rows, measures
recall@k against an exact chunked scan of the memory map, runs label transfer with the
approximate index on the memory-mapped bank, and prints one JSON object.

Features are a mixture of Gaussian clusters: unit centres, plus a shared low-rank spread with
a decaying spectrum (real patch features have a low intrinsic dimension), plus isotropic
noise, normalised. Each centre carries a class; a row's soft label puts weight U(0.6, 1) on
its centre's class and the rest on a random class.

    python tools/bench_large_bank.py --rows 10240000 --dim 768 --classes 21 --dir /tmp/bigbank
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hummingbird_fungi.memory.bank import BankWriter, MemoryBank, read_manifest, shard_files, shard_name
from hummingbird_fungi.config.schema import MemoryOptions
from hummingbird_fungi.memory.build import bank_recipe
from hummingbird_fungi.retrieval.indexes import Index, build_index
from hummingbird_fungi.retrieval.transfer import LabelTransfer

log = logging.getLogger("bench_large_bank")


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_240_000, help="bank rows M")
    parser.add_argument("--dim", type=int, default=768, help="feature dimension D")
    parser.add_argument("--classes", type=int, default=21, help="label classes C")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bigbank"), help="bank directory (reused if complete)")
    parser.add_argument("--patches-per-image", type=int, default=1024, help="rows per synthetic 'image'")
    parser.add_argument("--shard-images", type=int, default=256, help="images per shard")
    parser.add_argument("--centres", type=int, default=4096, help="Gaussian cluster centres")
    parser.add_argument("--latent", type=int, default=64, help="rank of the shared within-cluster spread")
    parser.add_argument("--spread", type=float, default=0.5, help="norm scale of the low-rank spread")
    parser.add_argument("--noise", type=float, default=0.25, help="norm scale of the isotropic noise")
    parser.add_argument("--query-noise", type=float, default=0.1, help="norm of the perturbation of query rows")
    parser.add_argument("--nlist", type=int, default=1024, help="IVF lists")
    parser.add_argument("--m", type=int, default=96, help="PQ sub-quantizers (bytes per code at 8 bits)")
    parser.add_argument("--nbits", type=int, default=8, help="bits per PQ sub-code")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 64],
                        help="lists visited per query: each is measured, the first is used for label transfer")
    parser.add_argument("--train-size", type=int, default=65536, help="rows sampled uniformly to train the index")
    parser.add_argument("--reorder-k", type=int, nargs="+", default=[0, 120, 480],
                        help="PQ candidates re-ranked by exact scores gathered from the memory map (0: none)")
    parser.add_argument("--k", type=int, default=30, help="neighbours")
    parser.add_argument("--queries", type=int, default=1000, help="queries timed, with exact ground truth")
    parser.add_argument("--transfer-images", type=int, default=1, help="query 'images' of patches for label transfer")
    parser.add_argument("--scan-rows", type=int, default=65536, help="rows per step of the exact scan")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse-index", action="store_true",
                        help="load the index file a previous run left next to the bank instead of building it")
    parser.add_argument("--cleanup", action="store_true", help="delete the bank directory at the end")
    return parser.parse_args()


# --------------------------------------------------------------------------- memory accounting


class MemoryMonitor:
    """Samples /proc/self/status in a thread and keeps the peaks of VmRSS, RssAnon and RssFile (GiB)."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peaks = {field: 0.0 for field in self.FIELDS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        """Read the current values and update the peaks."""
        with open("/proc/self/status") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name in self.peaks:
                    self.peaks[name] = max(self.peaks[name], int(value.split()[0]) / 2**20)

    def _run(self) -> None:
        """Sample until stopped."""
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "MemoryMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def report(self) -> dict[str, float]:
        """Peaks in GiB, plus the kernel's maximum resident set size."""
        out = {f"peak_{field}_gib": round(value, 3) for field, value in self.peaks.items()}
        out["ru_maxrss_gib"] = peak_rss_gib()
        return out


def peak_rss_gib() -> float:
    """The kernel's maximum resident set size of this process so far (GiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


# --------------------------------------------------------------------------- synthetic bank


def shard_bounds(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(first row, end row) of every shard."""
    step = args.patches_per_image * args.shard_images
    return [(start, min(start + step, args.rows)) for start in range(0, args.rows, step)]


def mixture_model(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cluster centres (K, D), low-rank spread basis (r, D) with total variance 1, centre classes (K,)."""
    gen = torch.Generator().manual_seed(args.seed)
    centres = F.normalize(torch.randn(args.centres, args.dim, generator=gen), dim=-1)
    scales = 1.0 / torch.arange(1, args.latent + 1).float().sqrt()
    basis = F.normalize(torch.randn(args.latent, args.dim, generator=gen), dim=-1) * (scales / scales.norm())[:, None]
    classes = torch.randint(args.classes, (args.centres,), generator=gen)
    return centres, basis, classes


def synthetic_shard(args: argparse.Namespace, model: tuple, number: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Features (rows, D) fp16 unit and soft labels (rows, C) fp16 of shard `number` (seeded by it)."""
    centres, basis, classes = model
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + number + 1)
    which = torch.randint(args.centres, (rows,), generator=gen)
    latent = torch.randn(rows, args.latent, generator=gen)
    feats = centres[which]
    feats.addmm_(latent, basis, alpha=args.spread)
    feats.add_(torch.randn(rows, args.dim, generator=gen), alpha=args.noise / args.dim ** 0.5)
    feats = F.normalize(feats, dim=-1).half().numpy()
    weight = 0.6 + 0.4 * torch.rand(rows, generator=gen)
    other = torch.randint(args.classes, (rows,), generator=gen)
    labels = torch.zeros(rows, args.classes)
    labels.scatter_add_(1, classes[which][:, None], weight[:, None])
    labels.scatter_add_(1, other[:, None], (1 - weight)[:, None])
    return feats, labels.half().numpy()


def bank_manifest(args: argparse.Namespace, bounds: list[tuple[int, int]]) -> tuple[dict, list[dict]]:
    """The synthetic bank's manifest for `BankWriter` (layout `MemoryBank.load` reads) and its shard list."""
    per_image = args.patches_per_image
    memory = MemoryOptions(size=args.rows, shard_images=args.shard_images, sampling="uniform", augment=False)
    shards = [{"name": shard_name(n), "epoch": 0, "images": [start // per_image, -(-end // per_image)],
               "rows": end - start} for n, (start, end) in enumerate(bounds)]
    return {
        "features": {"kind": "synthetic", "dim": args.dim, "backbone": "none", "architecture": "none",
                     "weights": "none", "options": {key: getattr(args, key) for key in
                                                    ("centres", "latent", "spread", "noise", "seed")}},
        "input_size": [0, 0],
        "grid": [0, 0],
        "num_classes": args.classes,
        "class_names": [f"class{c}" for c in range(args.classes)],
        "dataset": "synthetic",
        "num_images": -(-args.rows // per_image),
        "patches_per_image": per_image,
        "spec": bank_recipe(memory, args.seed, void_to_background=True),
    }, shards


def write_synthetic_bank(args: argparse.Namespace) -> float:
    """Write the bank with `BankWriter` (a killed run resumes at the first unfinished shard); seconds."""
    start = time.perf_counter()
    bounds = shard_bounds(args)
    build, shards = bank_manifest(args, bounds)
    if args.dir.exists():
        manifest = read_manifest(args.dir)
        if {key: manifest.get(key) for key in build} != build or manifest["shards"] != shards:
            raise SystemExit(f"{args.dir} holds a different bank; remove it")
        log.info("reusing the complete bank at %s", args.dir)
        return 0.0
    writer = BankWriter(args.dir, build)
    model = mixture_model(args)
    for number, (first, end) in enumerate(tqdm(bounds, desc="write bank", unit="shard")):
        if not writer.has_shard(number):
            writer.write_shard(number, *synthetic_shard(args, model, number, end - first))
    writer.seal(shards)
    return time.perf_counter() - start


def directory_bytes(path: Path) -> int:
    """Total size of the files under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- index and search


def shard_blocks(bank: MemoryBank, path: Path) -> Iterator[np.ndarray]:
    """Feature blocks of `bank` through fresh memory maps, unmapped after use (so scans leave no resident pages)."""
    for shard in bank.manifest["shards"]:
        block = np.load(shard_files(path, shard["name"])[0], mmap_mode="r")
        yield block
        del block


def build_ivfpq(bank: MemoryBank, args: argparse.Namespace) -> tuple[Index, dict[str, float]]:
    """Train `faiss_ivfpq` (no in-RAM refine copy) on a uniform sample of the bank, then add every shard."""
    timings = {}
    index = build_index("faiss_ivfpq", bank.dim, nlist=args.nlist, m=args.m, nbits=args.nbits,
                        nprobe=args.nprobe[0], train_size=args.train_size, reorder=False)
    if args.reuse_index:
        return load_ivfpq(index, bank, args), timings
    start = time.perf_counter()
    sample = bank.sample_features(args.train_size, args.seed)  # uniform over the whole bank, as from_bank does
    timings["sample_s"] = time.perf_counter() - start
    start = time.perf_counter()
    index.fit(sample)
    timings["train_s"] = time.perf_counter() - start
    del sample
    start = time.perf_counter()
    for block in tqdm(shard_blocks(bank, args.dir), total=len(bank.feature_blocks), desc="add", unit="shard"):
        index.add(block)
    timings["add_s"] = time.perf_counter() - start
    return index, timings


def load_ivfpq(index: Index, bank: MemoryBank, args: argparse.Namespace) -> Index:
    """Put the index file of a previous run into `index`, refusing one of another size or layout."""
    path = index_path(args.dir)
    if not path.exists():
        raise SystemExit(f"--reuse-index: no index file at {path}; run once without it")
    ivf = index.faiss.read_index(str(path))
    found = (ivf.ntotal, ivf.d, ivf.nlist, ivf.pq.M, ivf.pq.nbits)
    wanted = (bank.count, bank.dim, args.nlist, args.m, args.nbits)
    if found != wanted:
        raise SystemExit(f"--reuse-index: {path} holds (rows, dim, nlist, m, nbits) = {found}, not {wanted}")
    index.ivf = index.index = ivf
    set_nprobe(index, args.nprobe[0])
    return index


def index_file_bytes(index: Index, path: Path) -> int:
    """Size of the faiss index written to `path` (kept next to the bank)."""
    index.faiss.write_index(index.index, str(path))
    return path.stat().st_size


def make_queries(bank: MemoryBank, count: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Perturbed bank rows: (count, D) unit queries and the (count,) rows they came from."""
    gen = torch.Generator().manual_seed(seed)
    source = torch.randint(bank.count, (count,), generator=gen)
    queries = bank.gather_features(source)
    queries += torch.randn(queries.shape, generator=gen) * (noise / bank.dim ** 0.5)
    return F.normalize(queries, dim=-1), source


def exact_topk(bank: MemoryBank, path: Path, queries: torch.Tensor, k: int, scan_rows: int) -> torch.Tensor:
    """Exact inner-product top-k row ids (Q, k) by a chunked scan of the memory-mapped shards."""
    best_scores = torch.full((len(queries), k), -float("inf"))
    best_ids = torch.zeros(len(queries), k, dtype=torch.int64)
    offsets = bank.offsets
    blocks = tqdm(shard_blocks(bank, path), total=len(bank.feature_blocks), desc="exact scan", unit="shard")
    for number, block in enumerate(blocks):
        for start in range(0, len(block), scan_rows):
            chunk = torch.from_numpy(np.asarray(block[start:start + scan_rows], dtype=np.float32))
            scores = queries @ chunk.T  # (Q, rows)
            top = scores.topk(min(k, scores.shape[1]), dim=1)
            merged_scores = torch.cat([best_scores, top.values], 1)
            merged_ids = torch.cat([best_ids, top.indices + int(offsets[number]) + start], 1)
            keep = merged_scores.topk(k, dim=1).indices
            best_scores, best_ids = merged_scores.gather(1, keep), merged_ids.gather(1, keep)
    return best_ids


def rerank(bank: MemoryBank, index: Index, queries: torch.Tensor, scores: torch.Tensor, candidates: torch.Tensor,
           k: int) -> torch.Tensor:
    """Re-order approximate candidates (Q, R) by exact cosines from the memory map, as the label transfer does."""
    return LabelTransfer(bank, index, k=k, rerank=candidates.shape[1]).refine(queries, scores, candidates)[1]


def set_nprobe(index: Index, nprobe: int) -> None:
    """Lists visited per query from now on."""
    index.nprobe = index.ivf.nprobe = nprobe


def search_sweep(index: Index, bank: MemoryBank, queries: torch.Tensor, exact: torch.Tensor,
                 args: argparse.Namespace) -> list[dict]:
    """Throughput and recall@k for every (nprobe, reorder_k): one search per nprobe, re-ranked prefixes."""
    rows = []
    for nprobe in args.nprobe:
        set_nprobe(index, nprobe)
        start = time.perf_counter()
        scores, candidates = index.search(queries, max(args.k, *args.reorder_k))  # (Q, R) best first
        search_s = time.perf_counter() - start
        for reorder_k in args.reorder_k:
            start = time.perf_counter()
            ids = (rerank(bank, index, queries, scores[:, :reorder_k], candidates[:, :reorder_k], args.k)
                   if reorder_k else candidates[:, :args.k])
            seconds = search_s + time.perf_counter() - start
            rows.append({"nprobe": nprobe, "reorder_k": reorder_k, "seconds": round(seconds, 1),
                         "queries_per_s": round(len(queries) / seconds, 1),
                         f"recall@{args.k}": round(recall(ids, exact), 4)})
            log.info("search %s", rows[-1])
    set_nprobe(index, args.nprobe[0])
    return rows


def recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k."""
    hits = (approx[:, :, None] == exact[:, None, :]).any(-1).float().sum(1)
    return float((hits / exact.shape[1]).mean())


def label_transfer_check(bank: MemoryBank, index: Index, args: argparse.Namespace) -> dict:
    """Label transfer with the approximate index on the memory-mapped bank for a few query 'images'."""
    count = args.transfer_images * args.patches_per_image
    queries, source = make_queries(bank, count, args.query_noise, args.seed + 2)
    transfer = LabelTransfer(bank, index, k=args.k)
    start = time.perf_counter()
    probs = transfer(queries.reshape(args.transfer_images, args.patches_per_image, -1))  # (B, N, C)
    seconds = time.perf_counter() - start
    agreement = (probs.reshape(count, -1).argmax(-1) == bank.gather_labels(source).argmax(-1)).float().mean()
    return {"patches": count, "seconds": round(seconds, 3), "patches_per_s": round(count / seconds, 1),
            "prob_sum_max_err": round(float((probs.sum(-1) - 1).abs().max()), 5),
            "agreement_with_source_label": round(float(agreement), 4)}


def run(args: argparse.Namespace) -> dict:
    """Write, index, search and measure; the results dictionary."""
    results: dict = {"rows": args.rows, "dim": args.dim, "classes": args.classes, "threads": torch.get_num_threads()}
    results["write_s"] = round(write_synthetic_bank(args), 1)
    results["bank_bytes"] = directory_bytes(args.dir)
    bank = MemoryBank.load(args.dir, mmap=True)
    index, timings = build_ivfpq(bank, args)
    options = {key: value for key, value in index.options().items() if key != "reorder_k"}  # re-ranked here
    results["index"] = {**options, "ntotal": index.ntotal,
                        **{name: round(value, 1) for name, value in timings.items()},
                        "bytes": index_path(args.dir).stat().st_size if args.reuse_index
                        else index_file_bytes(index, index_path(args.dir))}
    queries, _ = make_queries(bank, args.queries, args.query_noise, args.seed + 1)
    start = time.perf_counter()
    exact = exact_topk(bank, args.dir, queries, args.k, args.scan_rows)
    results["exact_scan"] = {"queries": len(queries), "seconds": round(time.perf_counter() - start, 1)}
    results["search"] = search_sweep(index, bank, queries, exact, args)
    results["label_transfer"] = label_transfer_check(bank, index, args)
    return results


def index_path(bank_dir: Path) -> Path:
    """Where the index file is written: next to the bank directory."""
    return bank_dir.with_name(bank_dir.name + ".ivfpq.faiss")


def main() -> None:
    """Run the benchmark and print its JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args()
    start = time.perf_counter()
    with MemoryMonitor() as memory:
        results = run(args)
    results["memory"] = memory.report()
    results["total_s"] = round(time.perf_counter() - start, 1)
    if args.cleanup:
        shutil.rmtree(args.dir)
        index_path(args.dir).unlink()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Exercise every GPU path on generated data, check each against the CPU result, print throughput.

Checks (each prints one line and a JSON row; the exit status is 1 when one fails):

* `torch_exact`: `torch` exact search on CUDA (fp16 rows resident on the GPU) against exact CPU search
  (`exact`: faiss flat, or torch) of the first `--ref-queries` queries: recall@k and score error;
* `torch_stream`: the same bank with `stream=true` (rows in host memory, copied per memory chunk: the
  path of banks larger than GPU memory) against the resident GPU index;
* `faiss_gpu_flat`, `faiss_gpu_ivfpq`: when faiss has GPU support, `faiss` flat on the GPU against the CPU
  result, and faiss's GPU IVF-PQ (recall against exact; the `faiss_ivfpq` backend itself is CPU only);
* `features`: patch embeddings (fp32) and patch FUNGI (bf16 autocast on CUDA) of a random ViT-S/16 on the
  GPU against the CPU features: mean cosine per patch;
* `pipeline`: `run_hbird` on a small synthetic VOC (tools/bench_eval.py) on the GPU and the CPU: mIoU.

The bank is a mixture of clusters (unit fp16 rows); queries are perturbed bank rows. Without a CUDA
device it prints 'no CUDA device' and exits 0; `--tiny` runs every check on tiny sizes with the CPU
standing in for the GPU (a dry run for CI). Sized to finish in under 5 minutes on one H100.

    python tools/gpu_check.py            # on a GPU machine
    python tools/gpu_check.py --tiny     # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from bench_eval import write_synthetic_voc
from hummingbird_fungi.config.loader import load_config
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.eval.hbird import run_hbird
from hummingbird_fungi.features import EmbeddingFeatures, FungiPatchFeatures
from hummingbird_fungi.models.factory import create_encoder
from hummingbird_fungi.retrieval.indexes import Index, build_index, import_faiss
from hummingbird_fungi.runtime import synchronize

log = logging.getLogger("gpu_check")


@dataclass
class Sizes:
    """Problem sizes of one run."""

    rows: int  # bank rows
    dim: int
    queries: int  # searched on the GPU
    ref_queries: int  # also searched on the CPU
    k: int
    stream_chunk: int  # memory chunk of the streamed index
    model: str
    image: int  # feature and pipeline input size (px)
    images: int  # feature images
    train: int  # pipeline memory images
    val: int  # pipeline evaluation images


FULL = Sizes(rows=2_000_000, dim=384, queries=65536, ref_queries=512, k=30, stream_chunk=262144,
             model="dino_vits16", image=512, images=32, train=16, val=8)
TINY = Sizes(rows=3000, dim=32, queries=256, ref_queries=64, k=10, stream_chunk=500,
             model="vit_tiny_patch16_224", image=64, images=2, train=4, val=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (a dry run of every check)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- data


def clustered_bank(rows: int, dim: int, seed: int = 0, centres: int = 1024) -> torch.Tensor:
    """Unit rows (rows, dim) float16 scattered around random unit centres, like patch features."""
    gen = torch.Generator().manual_seed(seed)
    centre = F.normalize(torch.randn(min(centres, rows), dim, generator=gen), dim=-1)
    out = torch.empty(rows, dim, dtype=torch.float16)
    for start in range(0, rows, 262144):
        n = min(262144, rows - start)
        pick = torch.randint(0, len(centre), (n,), generator=gen)
        noise = torch.randn(n, dim, generator=gen) * (0.5 / dim ** 0.5)
        out[start:start + n] = F.normalize(centre[pick] + noise, dim=-1).half()
    return out


def perturbed_queries(bank: torch.Tensor, count: int, seed: int = 1) -> torch.Tensor:
    """`count` bank rows plus noise (count, dim) float32."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(bank), (count,), generator=gen)
    return bank[ids].float() + torch.randn(count, bank.shape[1], generator=gen) * (0.1 / bank.shape[1] ** 0.5)


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean fraction of the exact top-k ids (n, k) among the found ones (n, k)."""
    return float((found[:, :, None] == exact[:, None, :]).any(-1).float().mean())


def timed_search(index: Index, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(scores, ids, queries per second) of one search."""
    synchronize()
    start = time.perf_counter()
    scores, ids = index.search(queries, k)
    synchronize()
    return scores, ids, len(queries) / max(time.perf_counter() - start, 1e-9)


# --------------------------------------------------------------------------- checks


class Context:
    """What the checks share: sizes, the device standing for the GPU, the bank, queries and the CPU answer."""

    def __init__(self, sizes: Sizes, device: str) -> None:
        self.sizes, self.device = sizes, device
        self.bank = clustered_bank(sizes.rows, sizes.dim)
        self.queries = perturbed_queries(self.bank, sizes.queries)
        cpu = build_index("exact", sizes.dim, device="cpu")
        cpu.add(self.bank)
        self.cpu_name = cpu.name
        self.ref_scores, self.ref_ids, self.cpu_qps = timed_search(cpu, self.queries[:sizes.ref_queries], sizes.k)
        self.resident: tuple[torch.Tensor, torch.Tensor] | None = None

    def compare(self, name: str, index: Index, min_recall: float, score_atol: float) -> dict[str, Any]:
        """Search all queries with `index`; recall and score error on the reference queries."""
        n, k = self.sizes.ref_queries, self.sizes.k
        scores, ids, qps = timed_search(index, self.queries, k)
        found = recall(ids[:n], self.ref_ids)
        error = float((scores[:n] - self.ref_scores).abs().max())
        return {"check": name, "ok": found >= min_recall and error <= score_atol, f"recall@{k}": round(found, 4),
                "max_score_error": round(error, 6), "queries_per_s": round(qps, 1),
                "cpu_queries_per_s": round(self.cpu_qps, 1), "cpu_backend": self.cpu_name}


def check_torch_exact(ctx: Context) -> dict[str, Any]:
    index = build_index("torch", ctx.sizes.dim, device=ctx.device)
    index.add(ctx.bank)
    row = ctx.compare("torch_exact", index, min_recall=0.999, score_atol=1e-3)
    ctx.resident = index.search(ctx.queries[:ctx.sizes.ref_queries], ctx.sizes.k)
    return row


def check_torch_stream(ctx: Context) -> dict[str, Any]:
    index = build_index("torch", ctx.sizes.dim, device=ctx.device, stream=True, memory_chunk=ctx.sizes.stream_chunk)
    index.add(ctx.bank)
    row = ctx.compare("torch_stream", index, min_recall=0.999, score_atol=1e-3)
    if ctx.resident is not None:
        ids = index.search(ctx.queries[:ctx.sizes.ref_queries], ctx.sizes.k)[1]
        row["recall_vs_resident"] = round(recall(ids, ctx.resident[1]), 4)
        row["ok"] = row["ok"] and row["recall_vs_resident"] >= 0.999
    return row


def faiss_gpus() -> int:
    """GPUs faiss can use (0 without faiss or without its GPU build)."""
    try:
        return import_faiss().get_num_gpus()
    except ConfigError:
        return 0


def check_faiss_gpu_flat(ctx: Context) -> dict[str, Any]:
    if ctx.device == "cpu" or not faiss_gpus():
        return {"check": "faiss_gpu_flat", "skipped": "faiss has no GPU support here"}
    index = build_index("faiss", ctx.sizes.dim, device="cuda")
    index.add(ctx.bank)
    return ctx.compare("faiss_gpu_flat", index, min_recall=0.999, score_atol=1e-4)


def check_faiss_gpu_ivfpq(ctx: Context) -> dict[str, Any]:
    if ctx.device == "cpu" or not faiss_gpus():
        return {"check": "faiss_gpu_ivfpq", "skipped": "faiss has no GPU support here"}
    faiss = import_faiss()
    nlist, m = 4096, 48
    cpu = faiss.IndexIVFPQ(faiss.IndexFlatIP(ctx.sizes.dim), ctx.sizes.dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    start = time.perf_counter()
    gpu.train(ctx.bank[:200_000].float().numpy())
    gpu.add(ctx.bank.float().numpy())
    build_s = time.perf_counter() - start
    gpu.nprobe = 64
    n, k = ctx.sizes.ref_queries, ctx.sizes.k
    start = time.perf_counter()
    _, ids = gpu.search(ctx.queries.numpy(), k)
    qps = len(ctx.queries) / (time.perf_counter() - start)
    found = recall(torch.from_numpy(ids[:n]).long(), ctx.ref_ids)
    return {"check": "faiss_gpu_ivfpq", "ok": found >= 0.5, f"recall@{k}": round(found, 4), "nlist": nlist,
            "m": m, "nprobe": 64, "build_s": round(build_s, 1), "queries_per_s": round(qps, 1)}


def check_features(ctx: Context) -> dict[str, Any]:
    size = ctx.sizes.image
    images = torch.randn(ctx.sizes.images, 3, size, size, generator=torch.Generator().manual_seed(2))
    row: dict[str, Any] = {"check": "features", "ok": True}
    for name, make, min_cos in (("embeddings", EmbeddingFeatures, 0.999),
                                ("fungi", lambda e: FungiPatchFeatures(e, autocast="auto"), 0.95)):
        out = {}
        for device in ("cpu", ctx.device):
            extractor = make(create_encoder(ctx.sizes.model, pretrained=False, device=torch.device(device), seed=0))
            batches = [images[i:i + 4].to(device) for i in range(0, len(images), 4)]
            extractor(batches[0])  # warm-up
            synchronize()
            start = time.perf_counter()
            out[device] = torch.cat([extractor(b).float().cpu() for b in batches])  # (B, N, D)
            synchronize()
            row[f"{name}_{'gpu' if device != 'cpu' else 'cpu'}_img_per_s"] = round(
                len(images) / (time.perf_counter() - start), 2)
        cosine = float(F.cosine_similarity(out["cpu"], out[ctx.device], dim=-1).mean())
        row[f"{name}_mean_cosine"] = round(cosine, 5)
        row["ok"] = row["ok"] and cosine >= min_cos
    return row


def check_pipeline(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    row: dict[str, Any] = {"check": "pipeline"}
    with tempfile.TemporaryDirectory() as scratch:
        root = write_synthetic_voc(Path(scratch) / "voc", s.train, s.val, max(s.image, 64))
        for device in ("cpu", ctx.device):
            config = load_config(None, [
                f"model.name={s.model}", "model.pretrained=false", f"model.input_size=[{s.image},{s.image}]",
                "data.kind=voc", f"data.root={root}", "data.num_workers=0", "data.batch_size=4", "memory.size=null",
                f"device={device}"])
            start = time.perf_counter()
            results = run_hbird(config)
            key = "gpu" if device != "cpu" else "cpu"
            row[f"miou_{key}"] = round(results["miou"], 4)
            row[f"{key}_img_per_s"] = round((s.train + s.val) / (time.perf_counter() - start), 2)
    row["ok"] = abs(row["miou_cpu"] - row.get("miou_gpu", row["miou_cpu"])) <= 0.02
    return row


CHECKS: list[Callable[[Context], dict[str, Any]]] = [check_torch_exact, check_torch_stream, check_faiss_gpu_flat,
                                                     check_faiss_gpu_ivfpq, check_features, check_pipeline]


def run(tiny: bool) -> list[dict[str, Any]]:
    """Every check's row (an exception becomes a failed row naming it)."""
    ctx = Context(TINY if tiny else FULL, "cpu" if tiny else "cuda")
    rows = []
    for check in CHECKS:
        start = time.perf_counter()
        try:
            row = check(ctx)
        except Exception as error:  # a broken path is a failed check, the others still run
            log.exception("%s failed", check.__name__)
            row = {"check": check.__name__.removeprefix("check_"), "ok": False, "error": repr(error)}
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the checks; 0 when all pass or were skipped (or there is no CUDA device), 1 otherwise."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (python tools/gpu_check.py --tiny runs the checks on the CPU)")
        return 0
    rows = run(args.tiny)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    failed = [row["check"] for row in rows if row.get("ok") is False]
    print(f"{len(rows) - len(failed)} of {len(rows)} checks passed or skipped" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

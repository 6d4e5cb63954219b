"""k-NN backends: exact ones agree with numpy brute force and each other; approximate ones have high recall."""

import json
import sys
import warnings

import numpy as np
import pytest
import torch

from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.retrieval.indexes import BACKENDS, Index, build_index
from optional_packages import HAS_FAISS, requires_faiss

DIM = 32


def unit_rows(rows: int, seed: int, dim: int = DIM) -> np.ndarray:
    """Random unit-norm float32 rows (n, dim)."""
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_rows(rows: int, centres: int, seed: int, dim: int = DIM) -> np.ndarray:
    """Unit rows scattered around `centres` random directions (n, dim), like patch features."""
    rng = np.random.default_rng(seed)
    centre = unit_rows(centres, seed + 1, dim)
    x = centre[rng.integers(0, centres, rows)] + 0.3 * rng.standard_normal((rows, dim)).astype(np.float32) / dim**0.5
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(memory: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products in float64 -> (scores (n, k), ids (n, k))."""
    scores = queries.astype(np.float64) @ memory.astype(np.float64).T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, 1), ids


def add_in_blocks(index: Index, memory, sizes: list[int]) -> None:
    """Add `memory` as consecutive blocks of the given sizes."""
    start = 0
    for size in sizes:
        index.add(memory[start:start + size])
        start += size
    assert index.ntotal == start == len(memory)


def recall(found: torch.Tensor, exact: np.ndarray) -> float:
    """Fraction of exact neighbours that were found."""
    return np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found.numpy(), exact)])


def faiss_param(*values):
    """A parametrize case that needs faiss (skipped alone without it)."""
    return pytest.param(*values, marks=requires_faiss)


@pytest.fixture(scope="module", autouse=True)
def single_faiss_thread():
    """One OpenMP thread for faiss: its spinning threads crawl on small, shared CI machines (nothing without
    faiss: the torch backend's tests run anyway)."""
    if not HAS_FAISS:
        yield
        return
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return unit_rows(3000, 0), unit_rows(300, 1)


@pytest.mark.parametrize("backend,options", [
    ("torch", {}),
    ("torch", {"query_chunk": 128, "memory_chunk": 32}),
    faiss_param("faiss", {}),
])
def test_exact_backends_match_brute_force(data, backend, options):
    memory, queries = data
    index = build_index(backend, DIM, **options)
    add_in_blocks(index, memory, [1000, 37, 1963])
    scores, ids = index.search(queries, 40)  # k larger than both chunk sizes in the chunked case
    want_scores, want_ids = brute_force(memory, queries, 40)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    assert scores.shape == ids.shape == (300, 40) and scores.device.type == "cpu"
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    np.testing.assert_allclose(scores.numpy(), want_scores, atol=1e-5)


@requires_faiss
def test_torch_and_faiss_return_identical_ids(data):
    memory, queries = data
    results = []
    for backend in ("torch", "faiss"):
        index = build_index(backend, DIM)
        add_in_blocks(index, torch.from_numpy(memory), [500, 2500])
        results.append(index.search(torch.from_numpy(queries), 30))
    assert torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["torch", faiss_param("faiss")])
def test_float16_inputs(data, backend):
    memory, queries = data[0].astype(np.float16), data[1].astype(np.float16)
    index = build_index(backend, DIM, **({"memory_chunk": 256} if backend == "torch" else {}))
    index.add(memory[:1000])
    index.add(torch.from_numpy(memory[1000:]))
    scores, ids = index.search(torch.from_numpy(queries), 10)
    want_scores, want_ids = brute_force(memory.astype(np.float32), queries.astype(np.float32), 10)
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    np.testing.assert_allclose(scores.numpy(), want_scores, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", faiss_param("faiss")])
def test_read_only_memmap_shards(tmp_path, data, backend):
    memory, queries = data
    for i, part in enumerate(np.split(memory.astype(np.float16), [1200])):
        np.save(tmp_path / f"{i}.npy", part)
    index = build_index(backend, DIM)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "non-writable NumPy array" warning
        for i in range(2):
            index.add(np.load(tmp_path / f"{i}.npy", mmap_mode="r"))
    _, ids = index.search(queries, 5)
    np.testing.assert_array_equal(ids.numpy(), brute_force(memory.astype(np.float16).astype(np.float32), queries, 5)[1])


def test_torch_keeps_added_blocks_without_copying(data):
    memory = torch.from_numpy(data[0])
    index = build_index("torch", DIM, device="cpu")
    index.add(memory[:100])
    index.add(memory[100:])
    assert [b.data_ptr() for b in index.blocks] == [memory[:100].data_ptr(), memory[100:].data_ptr()]


@requires_faiss
def test_ivfpq_recall_with_large_nprobe():
    memory, queries = clustered_rows(10000, 50, 2), clustered_rows(200, 50, 3)
    index = build_index("faiss_ivfpq", DIM, nlist=32, m=8, nprobe=32, train_size=3000, reorder_k=200)
    add_in_blocks(index, memory, [2000, 2000, 6000])  # trains once 3000 rows arrived
    assert index.index.is_trained and not index.pending
    _, ids = index.search(queries, 10)
    assert recall(ids, brute_force(memory, queries, 10)[1]) > 0.95


@requires_faiss
def test_ivfpq_trains_at_search_on_small_banks():
    memory = clustered_rows(500, 20, 4)
    index = build_index("faiss_ivfpq", DIM, nlist=4096, m=8, nprobe=4096)  # nlist clamped to 500 rows
    index.add(memory)
    assert index.ntotal == 500 and not index.index.is_trained
    _, ids = index.search(memory[:20], 1)
    assert (ids[:, 0] == torch.arange(20)).float().mean() > 0.9
    assert json.dumps(index.options())


@requires_faiss
def test_hnsw_recall():
    memory, queries = clustered_rows(5000, 50, 5), clustered_rows(200, 50, 6)
    index = build_index("faiss_hnsw", DIM)
    add_in_blocks(index, memory, [2000, 3000])
    _, ids = index.search(queries, 10)
    assert recall(ids, brute_force(memory, queries, 10)[1]) > 0.9


def test_scann_recall_and_rebuild_after_add():
    pytest.importorskip("scann")
    memory, queries = clustered_rows(6000, 50, 7), clustered_rows(200, 50, 8)
    index = build_index("scann", DIM, num_leaves=64, num_leaves_to_search=32)
    add_in_blocks(index, memory[:4000], [1000, 3000])
    _, ids = index.search(queries, 10)
    assert recall(ids, brute_force(memory[:4000], queries, 10)[1]) > 0.9
    index.add(memory[4000:])
    scores, ids = index.search(queries, 10)
    assert recall(ids, brute_force(memory, queries, 10)[1]) > 0.9
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64


def test_scann_tiny_bank_clamps_leaves():
    pytest.importorskip("scann")
    memory = unit_rows(60, 9)
    index = build_index("scann", DIM)  # 512 leaves requested for 60 rows
    index.add(memory)
    _, ids = index.search(memory[:5], 5)
    assert ids.shape == (5, 5)
    assert torch.equal(ids[:, 0], torch.arange(5))


def test_scann_missing_raises_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "scann.scann_ops.py", None)
    with pytest.raises(ImportError, match=r"hummingbird-fungi\[scann\]"):
        build_index("scann", DIM)


@pytest.mark.parametrize("backend", ["torch", faiss_param("faiss")])
def test_exact_backends_keep_row_norms_and_say_their_scores_are_exact(data, backend):
    memory = data[0] * np.linspace(0.5, 2, len(data[0]), dtype=np.float32)[:, None]
    index = build_index(backend, DIM)
    add_in_blocks(index, memory.astype(np.float16), [1000, 2000])
    assert index.exact_scores
    np.testing.assert_allclose(index.row_norms().numpy(),
                               np.linalg.norm(memory.astype(np.float16).astype(np.float32), axis=1), rtol=1e-6)


def test_exact_picks_faiss_when_installed_else_torch(monkeypatch):
    """`exact` (the default backend) is faiss's flat index on CPU when faiss imports, torch otherwise."""
    if HAS_FAISS:
        assert build_index("exact", DIM, device="cpu").name == "faiss"
    monkeypatch.setitem(sys.modules, "faiss", None)
    index = build_index("exact", DIM, device="cpu")
    assert index.name == "torch" and index.options()["query_chunk"] == 1024


def test_registry_and_config_errors():
    assert {"exact", "torch", "faiss", "faiss_ivfpq", "faiss_hnsw", "scann"} <= set(BACKENDS.names())
    with pytest.raises(ConfigError, match="nope.*faiss.*torch"):
        build_index("nope", DIM)
    with pytest.raises(ConfigError, match="'torch'.*memory_chunk"):
        build_index("torch", DIM, chunk=3)
    with pytest.raises(ConfigError, match="device"):
        build_index("torch", DIM, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            build_index("torch", DIM, device="cuda")


@requires_faiss
def test_ivfpq_subquantisers_must_divide_the_dimension():
    with pytest.raises(ConfigError, match="divide"):
        build_index("faiss_ivfpq", DIM, m=5)


@pytest.mark.parametrize("backend", ["faiss", "faiss_ivfpq", "faiss_hnsw"])
def test_faiss_missing_names_the_extra(monkeypatch, backend):
    """Without faiss (blocked here, so this runs with and without the extras) a faiss backend says what to
    install, and the exact torch backend still works."""
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ConfigError, match=r"hummingbird-fungi\[faiss\].*backend=torch needs neither"):
        build_index(backend, DIM)
    index = build_index("torch", DIM)
    index.add(unit_rows(10, 0))
    assert index.search(unit_rows(2, 1), 3)[1].shape == (2, 3)


@pytest.mark.parametrize("backend", ["torch", faiss_param("faiss")])
def test_bad_shapes_and_k(data, backend):
    index = build_index(backend, DIM)
    with pytest.raises(ValueError, match="added rows"):
        index.add(np.zeros((3, DIM + 1), np.float32))
    with pytest.raises(ValueError, match="floating"):
        index.add(np.zeros((3, DIM), np.int64))
    index.add(data[0][:10])
    with pytest.raises(ValueError, match="k must be"):
        index.search(data[1], 11)
    scores, ids = index.search(data[1][:0], 3)
    assert scores.shape == ids.shape == (0, 3)


@pytest.mark.parametrize("backend", ["torch", faiss_param("faiss"), faiss_param("faiss_ivfpq"),
                                     faiss_param("faiss_hnsw")])
def test_options_are_json(backend):
    options = build_index(backend, DIM).options()
    assert options["backend"] == backend
    json.dumps(options)

"""Label transfer as production runs it (`LabelTransfer.vote_settings`, `retrieval.predict.predict`) against an
independent numpy k-NN + softmax vote, bilinear upsampling and confusion matrix; chunked upsampling against the
plain one; reranking and trained indexes."""

import numpy as np
import torch
import torch.nn.functional as F

import pytest

from hummingbird_fungi.config.schema import TransferOptions
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.memory.bank import MemoryBank
from hummingbird_fungi.retrieval.indexes import TorchIndex
from hummingbird_fungi.retrieval.predict import QueryBatch, predict
from hummingbird_fungi.retrieval.transfer import LabelTransfer, patch_probs_to_map, upsample_argmax
from optional_packages import requires_faiss
from references import bilinear_matrix

# ------------------------------------------------------------------ independent numpy reference (float64)


def cosines(queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(n, D), (M, D) -> (n, M) cosine similarities; a zero row has cosine 0 with everything."""
    def unit(x):
        x = x.astype(np.float64)
        norm = np.linalg.norm(x, axis=-1, keepdims=True)
        return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    return unit(queries) @ unit(rows).T


def knn_vote(sims: np.ndarray, labels: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """Each query's k most similar candidates (sims (n, M), labels (M, C) or (n, M, C)) weighted by
    softmax(cosine / T) -> (n, C)."""
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # (n, k)
    chosen = np.take_along_axis(sims, top, 1) / temperature
    weights = np.exp(chosen - chosen.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    picked = labels[top] if labels.ndim == 2 else np.take_along_axis(labels, top[..., None], 1)  # (n, k, C)
    return np.einsum("nk,nkc->nc", weights, picked)


def bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) -> (C, H, W) bilinear upsampling with half-pixel centres (align_corners=False), by hand."""
    rows, cols = bilinear_matrix(maps.shape[1], size[0]), bilinear_matrix(maps.shape[2], size[1])
    return np.einsum("Hh,chw,Ww->cHW", rows, maps.astype(np.float64), cols)


def confusion(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int) -> np.ndarray:
    """(C, C) counts, rows ground truth; void and out-of-range targets dropped."""
    keep = (target != ignore) & (target >= 0) & (target < num_classes)
    return np.bincount(num_classes * target[keep] + pred[keep], minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def random_bank(rows: int = 200, dim: int = 8, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit float16 feature rows (one of them all-zero) and soft labels, as a bank stores them."""
    gen = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(rows, dim, generator=gen), dim=-1)
    feats[17] = 0.0  # a zero row: cosine 0 with every query
    labels = torch.softmax(3 * torch.randn(rows, classes, generator=gen), -1)
    return feats.half().numpy(), labels.half().numpy()


class CountingIndex:
    """Wraps an index and counts its searches."""

    def __init__(self, index):
        self.index, self.calls = index, []

    def search(self, q, k):
        self.calls.append(k)
        return self.index.search(q, k)

    def __getattr__(self, name):
        return getattr(self.index, name)


SETTINGS = [(3, 0.05), (10, 0.1), (1, 1.0), (10, 0.02)]


def test_vote_settings_equal_a_numpy_knn_softmax_vote():
    """Every (k, T) of one call equals the numpy vote over the k most similar bank rows, from one index search of
    the largest k; queries need not be unit rows; stored float16 rows are rescored exactly."""
    feats, labels = random_bank()
    transfer = LabelTransfer.from_bank(MemoryBank.from_arrays(feats, labels, {}), "torch", k=10, temperature=0.1)
    transfer.index = CountingIndex(transfer.index)
    queries = 2.5 * torch.randn(2, 13, 8, generator=torch.Generator().manual_seed(1))  # (B, N, D)
    voted = transfer.vote_settings(queries, SETTINGS)
    assert transfer.index.calls == [10] and list(voted) == SETTINGS
    sims = cosines(queries.reshape(-1, 8).numpy(), feats.astype(np.float32))
    for k, temperature in SETTINGS:
        expected = knn_vote(sims, labels.astype(np.float64), k, temperature).reshape(2, 13, -1)
        np.testing.assert_allclose(voted[(k, temperature)].numpy(), expected, atol=1e-5,
                                   err_msg=f"k={k} T={temperature}")
    np.testing.assert_allclose(transfer(queries).numpy(), voted[(10, 0.1)].numpy(), atol=0)  # its own setting


def test_a_zero_bank_row_counts_with_cosine_zero():
    """A query orthogonal to every non-zero row but the first: the zero row votes with cosine 0, not NaN."""
    feats = np.array([[1, 0, 0], [0, 0, 0], [0, 1, 0]], np.float32)
    labels = np.eye(3, dtype=np.float32)
    transfer = LabelTransfer.from_bank(MemoryBank.from_arrays(feats, labels, {}), "torch", k=3, temperature=1.0)
    probs = transfer(torch.tensor([[[2.0, 0.0, 0.0]]]))[0, 0].numpy()
    e = np.exp([1.0, 0.0, 0.0])
    np.testing.assert_allclose(probs, e / e.sum(), atol=1e-6)


class Propagated:
    """Extra candidates (as video propagation supplies them): fixed rows with their own soft labels."""

    def __init__(self, feats: np.ndarray, labels: np.ndarray):
        self.feats, self.labels = torch.from_numpy(feats), torch.from_numpy(labels)

    def candidates(self, query, k):
        sims = F.normalize(query, dim=-1) @ F.normalize(self.feats, dim=-1).T
        best, ids = sims.topk(min(k, len(self.feats)), dim=1)
        return best, self.labels[ids]


def test_extra_candidates_compete_with_the_bank_for_the_k_places():
    feats, labels = random_bank(seed=2)
    extra_feats, extra_labels = random_bank(rows=40, seed=3)
    extra_feats[17] = extra_feats[16]  # no zero row here
    transfer = LabelTransfer.from_bank(MemoryBank.from_arrays(feats, labels, {}), "torch", k=10, temperature=0.1)
    extra = Propagated(extra_feats.astype(np.float32), extra_labels.astype(np.float32))
    queries = torch.randn(1, 20, 8, generator=torch.Generator().manual_seed(4))
    voted = transfer.vote_settings(queries, SETTINGS, extra)
    flat = queries.reshape(-1, 8).numpy()
    sims = np.concatenate([cosines(flat, feats.astype(np.float32)), cosines(flat, extra_feats.astype(np.float32))], 1)
    pool = np.concatenate([labels, extra_labels]).astype(np.float64)
    for k, temperature in SETTINGS:
        expected = knn_vote(sims, pool, k, temperature)
        np.testing.assert_allclose(voted[(k, temperature)][0].numpy(), expected, atol=1e-5, err_msg=f"k={k}")


def test_predict_masks_and_confusions_equal_the_numpy_pipeline():
    """predict(): per image and setting, the argmax of the bilinearly upsampled (half-pixel) patch votes, and its
    confusion matrix against a target with void pixels."""
    feats, labels = random_bank(seed=5)
    transfer = LabelTransfer.from_bank(MemoryBank.from_arrays(feats, labels, {}), "torch", k=10, temperature=0.1)
    grid, sizes = (3, 4), [(30, 41), (7, 9)]
    queries = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(6))
    rng = np.random.default_rng(7)
    targets = [rng.integers(0, 4, size) for size in sizes]
    targets[0][:5] = 255  # void rows
    settings = [(10, 0.1), (3, 0.05)]
    out = list(predict([QueryBatch(grid, sizes, features=queries, targets=[torch.from_numpy(t) for t in targets])],
                       transfer, settings=settings, ignore_index=255, class_chunk=3))
    assert [p.key for p in out] == [0, 1]
    sims = cosines(queries.reshape(-1, 8).numpy(), feats.astype(np.float32))
    for k, temperature in settings:
        probs = knn_vote(sims, labels.astype(np.float64), k, temperature).reshape(2, 3, 4, -1)  # (B, h, w, C)
        for i, prediction in enumerate(out):
            mask = bilinear(probs[i].transpose(2, 0, 1), sizes[i]).argmax(0)
            np.testing.assert_array_equal(prediction.masks[(k, temperature)].numpy(), mask)
            np.testing.assert_array_equal(prediction.confusions[(k, temperature)].numpy(),
                                          confusion(mask, targets[i], 4, 255))
    np.testing.assert_allclose(out[1].probs.numpy(), knn_vote(sims, labels.astype(np.float64), 10, 0.1)[12:],
                               atol=1e-5)  # the first setting's patch votes
    assert out[0].confusions[(10, 0.1)].sum() == 25 * 41  # the 5 void rows are not counted


def test_label_transfer_end_to_end_by_hand():
    feats = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
    labels = np.array([[1, 0], [0, 1], [0.5, 0.5]], dtype=np.float32)
    bank = MemoryBank.from_arrays(feats, labels, {})
    transfer = LabelTransfer.from_bank(bank, "torch", k=2, temperature=0.1)
    query = torch.tensor([[[1.0, 0.1]]])  # (B=1, N=1, D=2)
    probs = transfer(query)
    q = query[0, 0] / query[0, 0].norm()
    sims = torch.tensor(feats) @ q
    top = sims.topk(2).indices
    w = torch.softmax(sims[top] / 0.1, 0)
    expected = (w[:, None] * torch.tensor(labels)[top]).sum(0)
    assert torch.allclose(probs[0, 0], expected, atol=1e-6)


def test_chunked_upsample_argmax_equals_plain():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(12, 151), -1)  # (N=3x4, C)
    maps = patch_probs_to_map(probs, (3, 4))
    plain = F.interpolate(maps[None], size=(30, 41), mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(upsample_argmax(maps, (30, 41), class_chunk=16), plain)


def test_upsample_ties_go_to_lowest_class():
    maps = torch.ones(5, 2, 2)
    assert upsample_argmax(maps, (4, 4), class_chunk=2).eq(0).all()


class StubIndex:
    """An index answering fixed neighbours (approximate order, a missing -1)."""

    exact_scores = False

    def __init__(self, ids):
        self.ids = torch.tensor(ids)

    def search(self, q, k):
        ids = self.ids[:, :k]
        return torch.zeros(ids.shape), ids


def test_rerank_keeps_exact_best_and_missing_ids_are_dropped():
    feats = np.array([[1, 0], [0, 1], [0.8, 0.6], [-1, 0], [0, -1]], dtype=np.float32)
    labels = np.eye(5, dtype=np.float32)
    bank = MemoryBank.from_arrays(feats, labels, {})
    transfer = LabelTransfer(bank, StubIndex([[3, 1, -1, 0, 2]]), k=2, temperature=0.1, rerank=5)
    sims, ids = transfer.neighbours(torch.tensor([[1.0, 0.0]]))
    assert ids.tolist() == [[0, 2]] and torch.allclose(sims, torch.tensor([[1.0, 0.8]]))
    probs = transfer(torch.tensor([[[1.0, 0.0]]]))[0, 0]
    w = torch.softmax(torch.tensor([1.0, 0.8]) / 0.1, 0)
    assert torch.allclose(probs, torch.tensor([w[0], 0, w[1], 0, 0]))
    lonely = LabelTransfer(bank, StubIndex([[-1, -1]]), k=2, temperature=0.1)
    assert lonely(torch.tensor([[[1.0, 0.0]]])).abs().sum() == 0


@requires_faiss
def test_trained_index_fits_a_sample_of_the_whole_bank():
    """An IVF index built from a bank trains on rows from all of it, not only the first ones."""
    gen = torch.Generator().manual_seed(0)
    dim = 16
    first = F.normalize(torch.randn(600, dim, generator=gen) * 0.1 + F.one_hot(torch.tensor(0), dim), dim=-1)
    last = F.normalize(torch.randn(600, dim, generator=gen) * 0.1 + F.one_hot(torch.tensor(1), dim), dim=-1)
    feats = torch.cat([first, last]).numpy()
    bank = MemoryBank.from_arrays(feats, np.ones((1200, 1), dtype=np.float32), {})
    transfer = LabelTransfer.from_bank(bank, "faiss_ivfpq", k=5, nlist=8, m=4, train_size=300, reorder=False)
    centroids = torch.from_numpy(transfer.index.ivf.quantizer.reconstruct_n(0, 8))  # (nlist, D)
    assert F.normalize(centroids, dim=-1)[:, 1].max() > 0.8  # some list sits in the last rows' region
    assert transfer.index.ntotal == 1200


@requires_faiss
def test_rescoring_in_chunks_equals_one_pass(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    feats = F.normalize(torch.randn(500, 8, generator=gen), dim=-1).numpy()
    labels = torch.softmax(torch.randn(500, 4, generator=gen), -1).numpy()
    bank = MemoryBank.from_arrays(feats, labels, {})
    queries = torch.randn(2, 37, 8, generator=gen)
    transfer = LabelTransfer.from_bank(bank, "faiss_ivfpq", k=5, rerank=50, nlist=4, m=4, nprobe=2, reorder=False)
    whole = transfer(queries)
    monkeypatch.setattr("hummingbird_fungi.retrieval.transfer.GATHER_ELEMENTS", 50 * 8 * 3)  # 3 queries per step
    torch.testing.assert_close(transfer(queries), whole, rtol=0, atol=0)


# ------------------------------------------------------------------ transfer.rescore


def fp16_bank(rows: int = 400, dim: int = 16, classes: int = 5, seed: int = 8) -> MemoryBank:
    """Unit rows rounded to float16 (norms off 1 by ~1e-4, as a real bank's) and float16 soft labels."""
    feats, labels = random_bank(rows, dim, classes, seed)
    return MemoryBank.from_arrays(feats, labels, {})


def no_gather(*args):
    raise AssertionError("rescore=auto on an exact index must not read bank rows back")


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=requires_faiss)])
def test_auto_rescore_on_exact_backends_equals_always_without_reading_rows(backend, monkeypatch):
    """rescore=auto on an exact index divides its inner products by the query and row norms: the cosines the
    reference re-gathers (float16 rows, non-unit queries, a zero row), without touching the bank's rows."""
    bank = fp16_bank()
    queries = 3 * torch.randn(2, 50, 16, generator=torch.Generator().manual_seed(9))
    always = LabelTransfer.from_bank(bank, backend, k=30, temperature=0.02, rescore="always")
    auto = LabelTransfer.from_bank(bank, backend, k=30, temperature=0.02)
    assert auto.rescore == "auto" and auto.index.exact_scores and not auto.regathers and always.regathers
    want = always.vote_settings(queries, SETTINGS)
    monkeypatch.setattr(bank, "gather_features", no_gather)
    got = auto.vote_settings(queries, SETTINGS)
    for setting in SETTINGS:
        torch.testing.assert_close(got[setting], want[setting], atol=2e-6, rtol=0)
        assert torch.equal(got[setting].argmax(-1), want[setting].argmax(-1))


def test_auto_rescore_reads_rows_back_when_the_index_holds_lower_precision(monkeypatch):
    """An exact index storing rows below their added precision (torch on CUDA: float16) is re-scored from the
    bank under auto; rescore=never keeps the index's raw inner products."""
    monkeypatch.setattr(TorchIndex, "storage_itemsize", lambda self: 2)
    feats, labels = random_bank()
    bank = MemoryBank.from_arrays(feats.astype(np.float32), labels, {})
    transfer = LabelTransfer.from_bank(bank, "torch", k=5)
    assert not transfer.index.exact_scores and transfer.regathers
    never = LabelTransfer.from_bank(bank, "torch", k=5, rescore="never")
    query = 2 * torch.from_numpy(feats[:3].astype(np.float32))
    sims, ids = never.neighbours(query)
    torch.testing.assert_close(sims, (query[:, None] * torch.from_numpy(feats[ids.numpy()]).float()).sum(-1))


@requires_faiss
def test_auto_rescore_reads_rows_back_for_approximate_backends():
    transfer = LabelTransfer.from_bank(fp16_bank(), "faiss_hnsw", k=5)
    assert not transfer.index.exact_scores and transfer.regathers


def test_rescore_accepts_the_former_booleans_and_names_bad_values():
    assert TransferOptions().rescore == "auto"
    assert TransferOptions(rescore=True).rescore == "always" and TransferOptions(rescore=False).rescore == "never"
    assert TransferOptions.from_mapping({"rescore": "never"}).rescore == "never"
    with pytest.raises(ConfigError, match="transfer.rescore='sometimes'"):
        TransferOptions(rescore="sometimes")
    bank = fp16_bank()
    with pytest.raises(ConfigError, match="transfer.rescore='sometimes'"):
        LabelTransfer.from_bank(bank, "torch", rescore="sometimes")
    assert LabelTransfer.from_bank(bank, "torch", rescore=False).rescore == "never"


def test_votes_in_query_steps_equal_one_pass(monkeypatch):
    """vote_settings in steps of a few queries (memory flat in the number of queries) equals one pass (up to the
    matmul's summation order)."""
    bank = fp16_bank()
    transfer = LabelTransfer.from_bank(bank, "torch", k=10, temperature=0.1)
    transfer.index = CountingIndex(transfer.index)
    queries = torch.randn(3, 20, 16, generator=torch.Generator().manual_seed(10))
    whole = transfer.vote_settings(queries, SETTINGS)
    monkeypatch.setattr("hummingbird_fungi.retrieval.transfer.VOTE_ELEMENTS", 7 * 10 * 5)  # 7 queries a step
    steps = transfer.vote_settings(queries, SETTINGS)
    assert transfer.index.calls == [10] + [10] * 9
    for setting in SETTINGS:
        torch.testing.assert_close(steps[setting], whole[setting], atol=1e-6, rtol=0)

"""Label transfer against a hand computation, and chunked upsampling against the plain one."""

import math

import numpy as np
import torch
import torch.nn.functional as F

from hummingbird_fungi.retrieval.transfer import (LabelTransfer, aggregate_labels, attention_weights,
                                              patch_probs_to_map, upsample_argmax)
from hummingbird_fungi.memory.bank import MemoryBank


def test_attention_by_hand():
    query = torch.tensor([[2.0, 0.0]])  # not unit: normalised inside
    keys = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])
    w = attention_weights(query, keys, temperature=0.5)
    e1, e0 = math.exp(1 / 0.5), math.exp(0.0)
    assert torch.allclose(w, torch.tensor([[e1 / (e1 + e0), e0 / (e1 + e0)]]))
    labels = torch.tensor([[[1.0, 0.0], [0.25, 0.75]]])
    out = aggregate_labels(w, labels)
    expected = [(e1 * 1 + e0 * 0.25) / (e1 + e0), (e0 * 0.75) / (e1 + e0)]
    assert torch.allclose(out, torch.tensor([expected]))


def test_zero_row_gets_zero_similarity():
    w = attention_weights(torch.tensor([[1.0, 0.0]]), torch.tensor([[[0.0, 0.0], [1.0, 0.0]]]), 1.0)
    assert torch.allclose(w[0, 0] / w[0, 1], torch.tensor(math.exp(-1.0)))


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

"""eval/study.py against the toolkit's own label-transfer path and hand computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.eval.metrics import ConfusionMatrix
from hummingbird_fungi.eval.study import (Composition, Pca, compose, image_confusions, parse_composition, search,
                                          transfer_probs)
from hummingbird_fungi.features.fungi_patch import combine
from hummingbird_fungi.memory.bank import MemoryBank
from hummingbird_fungi.retrieval.transfer import LabelTransfer, predict_masks


def test_parse_composition() -> None:
    assert parse_composition("embeddings") == Composition("embeddings")
    assert parse_composition("x:grads=a+b,w=0.5,dims=96,pca=256,whiten") == Composition(
        "x", ("a", "b"), 0.5, 96, 256, True)
    with pytest.raises(ConfigError, match="unknown key 'weight'"):
        parse_composition("x:weight=2")
    with pytest.raises(ConfigError, match="whiten needs pca"):
        parse_composition("x:grads=a,whiten")


def test_compose_is_the_fungi_feature() -> None:
    tokens, a, b = torch.randn(5, 4), torch.randn(5, 6), torch.randn(5, 3)
    torch.testing.assert_close(compose(tokens, [], Composition("e")), F.normalize(tokens, dim=-1))
    torch.testing.assert_close(compose(tokens, [a], Composition("f", ("a",), 2.0)), combine(tokens, a, 2.0))
    both = compose(tokens, [a, b], Composition("f", ("a", "b"), 0.5, dims=2))
    # by hand: [x̂ ; 0.5 â[:2]/|â[:2]| ; 0.5 b̂[:2]/|b̂[:2]|], then unit length (norm^2 = 1 + 0.25 + 0.25)
    hand = torch.cat([F.normalize(tokens, dim=-1), 0.5 * F.normalize(a[:, :2], dim=-1),
                      0.5 * F.normalize(b[:, :2], dim=-1)], dim=-1) / math.sqrt(1.5)
    torch.testing.assert_close(both, hand)


def test_transfer_probs_by_hand() -> None:
    memory = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    labels = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [1.0, 0.0]])
    sims, ids = search(torch.tensor([[1.0, 0.0]]), memory, 3)
    assert ids.tolist() == [[0, 1, 2]]
    probs = transfer_probs(sims, ids, labels, 2, 0.1)  # cosines 1 and 0.8: weights softmax([10, 8])
    w = 1 / (1 + math.exp(-2))
    torch.testing.assert_close(probs, torch.tensor([[w + 0.5 * (1 - w), 0.5 * (1 - w)]]))
    with pytest.raises(ConfigError, match="exceeds"):
        transfer_probs(sims, ids, labels, 4, 0.1)


def test_image_confusions_sum_to_the_toolkit_evaluation() -> None:
    gen = torch.Generator().manual_seed(0)
    grid, classes = (3, 4), 3
    memory = F.normalize(torch.randn(40, 8, generator=gen), dim=-1)
    labels = torch.softmax(4 * torch.randn(40, classes, generator=gen), dim=-1)
    queries = F.normalize(torch.randn(2, 12, 8, generator=gen), dim=-1)
    targets = [torch.randint(0, classes, (9, 12), generator=gen), torch.randint(0, classes + 1, (6, 8), generator=gen)]
    sims, ids = search(queries.reshape(-1, 8), memory, 7)
    ours = image_confusions(transfer_probs(sims, ids, labels, 5, 0.05), grid, targets, classes, ignore_index=classes)
    manifest = {"features": {"kind": "test"}, "num_classes": classes, "shards": [], "count": 40}
    bank = MemoryBank([memory.numpy()], [labels.numpy()], manifest)
    transfer = LabelTransfer.from_bank(bank, k=5, temperature=0.05)
    toolkit = ConfusionMatrix(classes, ignore_index=classes)
    for pred, target in zip(predict_masks(transfer, queries, grid, [tuple(t.shape) for t in targets]), targets):
        toolkit.update(pred, target)
    assert ours.shape == (2, classes, classes)
    np.testing.assert_array_equal(ours.sum(0), toolkit.matrix.numpy())
    assert ours[1].sum() == int((targets[1] != classes).sum())  # void pixels of the second image not counted


def test_pca_finds_the_main_axis_and_whitens() -> None:
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(2000, 3, generator=gen) * torch.tensor([5.0, 1.0, 0.2]) + torch.tensor([1.0, 2.0, 3.0])
    pca = Pca(rows, 2, whiten=True)
    assert abs(float(pca.basis[0, 0])) > 0.999 and abs(float(pca.basis[1, 1])) > 0.999
    projected = (rows.double() - pca.mean) @ pca.basis * pca.scale
    torch.testing.assert_close(projected.T @ projected / (len(rows) - 1), torch.eye(2, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    assert torch.allclose(pca(rows).norm(dim=-1), torch.ones(len(rows)))
    with pytest.raises(ConfigError, match="pca=4"):
        Pca(rows, 4)

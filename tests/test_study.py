"""eval/study.py against independent numpy references: brute-force k-NN, softmax vote, bilinear upsampling,
confusion matrices and DAVIS J computed in the test; the bank builder's own draw; the part cache."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.eval.study import (MASKS, TOKENS, Composition, DavisSequence, DavisStudy, ImageStudy, PartSet,
                                          compose, memory_rows, parse_composition, score_davis, score_images,
                                          tuned_comparisons)
from hummingbird_fungi.features.cache import FeatureCache
from hummingbird_fungi.features.fungi_patch import FungiPatchFeatures, combine
from hummingbird_fungi.memory.build import build_memory_bank
from hummingbird_fungi.memory.labels import patchify_labels
from hummingbird_fungi.models.encoders import TimmViTEncoder
from hummingbird_fungi.testing import tiny_timm_vit
from test_memory_bank import FakeBackbone, PatchMeanFeatures, ToyDataset, spec

GRID, CLASSES, VOID = (3, 4), 3, 3  # patch grid, classes, the eval masks' ignore id


# --------------------------------------------------------------------------- numpy references


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def composed(tokens: np.ndarray, grads: list[np.ndarray], weight: float = 1.0, dims: int | None = None) -> np.ndarray:
    """normalise([x̂ ; w ĝ_1[:dims] ; ...]) in float64."""
    parts = [unit(tokens)] + [weight * unit(g[:, :dims]) for g in grads]
    return unit(np.concatenate(parts, axis=1)) if grads else parts[0]


def whitened_pca(memory: np.ndarray, queries: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows of the whitened top-`dims` PCA fitted on the memory (np.cov, eigh)."""
    mean = memory.mean(0)
    values, vectors = np.linalg.eigh(np.cov(memory, rowvar=False))
    axes, scale = vectors[:, ::-1][:, :dims], values[::-1][:dims] ** -0.5
    return unit((memory - mean) @ axes * scale), unit((queries - mean) @ axes * scale)


def bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) -> (C, H, W), half-pixel centres, edges clamped (align_corners=False)."""
    def taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        low = np.floor(src).astype(int)
        return low, np.minimum(low + 1, n_in - 1), src - low

    y0, y1, fy = taps(maps.shape[1], size[0])
    x0, x1, fx = taps(maps.shape[2], size[1])
    rows = maps[:, y0] * (1 - fy)[None, :, None] + maps[:, y1] * fy[None, :, None]  # (C, H, w)
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


def reference_masks(memory: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int, temperature: float,
                    sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Brute-force cosine top-k, softmax(cos / T) vote of soft labels, bilinear upsampling, argmax per image."""
    sims = queries @ memory.T  # (n N, M)
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(sims, nearest, 1) / temperature
    weights = np.exp(top - top.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    probs = np.einsum("qk,qkc->qc", weights, labels[nearest])  # (n N, C)
    per_image = GRID[0] * GRID[1]
    return [bilinear(probs[i * per_image:(i + 1) * per_image].T.reshape(-1, *GRID), size).argmax(0)
            for i, size in enumerate(sizes)]


def reference_confusion(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(C, C) counts, rows ground truth; void and out-of-range targets dropped."""
    keep = (target >= 0) & (target < CLASSES) & (target != VOID)
    matrix = np.zeros((CLASSES, CLASSES), dtype=np.int64)
    np.add.at(matrix, (target[keep], pred[keep]), 1)
    return matrix


def reference_j(pred: np.ndarray, target: np.ndarray) -> float:
    """Foreground IoU (ids != 0) with 255 dropped; 1 when both are empty."""
    keep = target != 255
    fg_pred, fg_true = (pred != 0) & keep, (target != 0) & keep
    union = (fg_pred | fg_true).sum()
    return 1.0 if union == 0 else float((fg_pred & fg_true).sum() / union)


# --------------------------------------------------------------------------- toy studies


def part_set(arrays: dict[str, np.ndarray]) -> PartSet:
    """An in-RAM PartSet holding (n N, dim) arrays, one chunk each."""
    caches = {}
    for name, array in arrays.items():
        cache = FeatureCache(None, (name,), {}, len(array), array.shape[1], chunk_size=len(array), dtype="float16")
        cache.put(0, array)
        caches[name] = cache
    return PartSet(caches, GRID[0] * GRID[1])


def read(parts: PartSet, name: str) -> np.ndarray:
    """The stored (float16) rows as float64."""
    return parts.caches[name].load().astype(np.float64)


def toy_study(seed: int = 0, n_memory: int = 5, n_query: int = 3) -> ImageStudy:
    """Random tokens (E=6) and two gradient parts (P=5, 4), random label counts, targets of varied sizes."""
    rng = np.random.default_rng(seed)
    per_image = GRID[0] * GRID[1]

    def parts(n: int) -> PartSet:
        return part_set({TOKENS: rng.normal(size=(n * per_image, 6)), "a": rng.normal(size=(n * per_image, 5)),
                         "b": rng.normal(size=(n * per_image, 4))})

    counts = torch.from_numpy(rng.integers(0, 3, size=(n_memory, per_image, CLASSES)).astype(np.float32))
    counts[0, 0] = 0  # an all-void memory patch: soft label 0
    sizes = [(9, 12), (6, 8), (7, 5)][:n_query]
    targets = [torch.from_numpy(rng.integers(0, CLASSES + 1, size=size)) for size in sizes]  # VOID included
    return ImageStudy(parts(n_memory), parts(n_query), counts, targets, GRID, CLASSES, VOID, "label_aware", 0,
                      (GRID[0] * 4, GRID[1] * 4))


def reference_images(study: ImageStudy, memory: np.ndarray, queries: np.ndarray, rows, k: int,
                     temperature: float) -> np.ndarray:
    """(n, C, C) reference matrices of the memory rows `rows`."""
    counts = study.counts.reshape(-1, CLASSES).numpy().astype(np.float64)[rows]
    labels = counts / np.maximum(counts.sum(1, keepdims=True), 1e-12)
    masks = reference_masks(memory, labels, queries, k, temperature, [tuple(t.shape) for t in study.targets])
    return np.stack([reference_confusion(m, t.numpy()) for m, t in zip(masks, study.targets)])


# --------------------------------------------------------------------------- tests


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


@pytest.mark.parametrize("composition", [Composition("embeddings"), Composition("f", ("a", "b"), 0.5, dims=3)])
def test_image_scores_equal_a_brute_force_reference(composition) -> None:
    study = toy_study()
    grads = list(composition.grads)
    memory = composed(read(study.memory, TOKENS), [read(study.memory, g) for g in grads], composition.weight,
                      composition.dims)
    queries = composed(read(study.queries, TOKENS), [read(study.queries, g) for g in grads], composition.weight,
                       composition.dims)
    rows, count = memory_rows(study, 20)  # 4 of the 12 patches of each of the 5 memory images
    assert count == 20 and len(np.unique(rows)) == 20
    settings = [(3, 0.1), (7, 0.05)]
    for chosen in (slice(None), rows):
        scores = score_images(study, composition, chosen, settings)
        for k, temperature in settings:
            expected = reference_images(study, memory[chosen], queries, chosen, k, temperature)
            assert scores[(k, temperature)].shape == (3, CLASSES, CLASSES)
            np.testing.assert_array_equal(scores[(k, temperature)], expected)
    assert scores[settings[0]][1].sum() == int((study.targets[1] != VOID).sum())  # void pixels not counted


def test_whitened_pca_rows_equal_the_numpy_reference() -> None:
    study = toy_study(seed=1, n_memory=8)
    composition = Composition("w", ("a",), pca=5, whiten=True)
    memory = composed(read(study.memory, TOKENS), [read(study.memory, "a")])
    queries = composed(read(study.queries, TOKENS), [read(study.queries, "a")])
    memory, queries = whitened_pca(memory, queries, 5)
    scores = score_images(study, composition, slice(None), [(4, 0.2)])
    np.testing.assert_array_equal(scores[(4, 0.2)], reference_images(study, memory, queries, slice(None), 4, 0.2))


def test_one_search_answers_every_setting_as_separate_runs_do() -> None:
    study = toy_study(seed=2)
    composition = Composition("f", ("a",), 2.0)
    settings = [(1, 0.02), (4, 0.5), (4, 0.02), (9, 0.1)]
    together = score_images(study, composition, slice(None), settings)
    assert list(together) == settings
    for setting in settings:
        alone = score_images(study, composition, slice(None), [setting])
        np.testing.assert_array_equal(together[setting], alone[setting])


def test_memory_rows_are_the_rows_of_a_bank_built_bounded() -> None:
    # the builder: an unbounded and a 30-row bank of the same toy images (1 epoch, seed 0)
    dataset, extractor = ToyDataset(), PatchMeanFeatures(FakeBackbone())
    full = build_memory_bank(dataset, extractor, spec(size=None, augmentation_epochs=1))
    bounded = build_memory_bank(dataset, extractor, spec(size=30, augmentation_epochs=1))
    masks = torch.stack([dataset[i]["mask"] for i in range(len(dataset))])
    counts = patchify_labels(masks, 4, 3, void_to_background=False)
    study = dataclasses.replace(toy_study(), counts=counts)
    rows, count = memory_rows(study, 30)
    assert count == bounded.count == 30
    np.testing.assert_array_equal(np.concatenate(full.feature_blocks)[rows], np.concatenate(bounded.feature_blocks))
    assert memory_rows(study, None) == (slice(None), full.count)


def test_davis_scores_equal_a_brute_force_reference() -> None:
    rng = np.random.default_rng(3)
    per_image = GRID[0] * GRID[1]
    sequences = {}
    for name, frames in (("one", 3), ("two", 2)):
        parts = part_set({TOKENS: rng.normal(size=(frames * per_image, 6)),
                          "a": rng.normal(size=(frames * per_image, 5))})
        counts = torch.from_numpy(rng.integers(0, 4, size=(1, per_image, 2)).astype(np.float32))
        targets = [rng.choice([0, 1, 255], size=(10, 13), p=[0.5, 0.4, 0.1]) for _ in range(frames - 1)]
        sequences[name] = DavisSequence(parts, counts, targets)
    study = DavisStudy(sequences, GRID, (GRID[0] * 14, GRID[1] * 14))
    composition = Composition("f", ("a",))
    settings = [(2, 0.1), (5, 0.03)]
    scores = score_davis(study, composition, settings)
    for k, temperature in settings:
        expected = []
        for sequence in sequences.values():
            feats = composed(read(sequence.parts, TOKENS), [read(sequence.parts, "a")])
            counts = sequence.counts[0].numpy().astype(np.float64)
            labels = counts / np.maximum(counts.sum(1, keepdims=True), 1e-12)
            masks = reference_masks(feats[:per_image], labels, feats[per_image:], k, temperature,
                                    [t.shape for t in sequence.targets])
            expected.append(np.mean([reference_j(m, t) for m, t in zip(masks, sequence.targets)]))
        np.testing.assert_allclose(scores[(k, temperature)], expected, rtol=0, atol=1e-12)


def test_part_cache_extracts_each_missing_part_once(tmp_path) -> None:
    encoder = TimmViTEncoder(tiny_timm_vit(img_size=32))
    images = [{"image": torch.randn(3, 32, 48, generator=torch.Generator().manual_seed(i)),
               "mask": torch.full((32, 48), i)} for i in range(5)]
    grads = {"g": FungiPatchFeatures(encoder, head_dim=4, gradient_dtype="float32")}  # batch-free to fp32 rounding
    key = {"data": "toy"}
    parts = PartSet.open(tmp_path, ("train",), key, encoder, grads, 5, (2, 3), batch=2, mask_size=(32, 48))
    assert parts.num_images == 5 and list(parts.caches) == [TOKENS, "g", MASKS]
    parts.fill(images, encoder, grads, torch.device("cpu"), "toy")
    batch = torch.stack([item["image"] for item in images])
    with torch.no_grad():
        tokens = encoder(batch)  # (5, 6, E)
    np.testing.assert_allclose(parts.caches[TOKENS].load(), tokens.reshape(30, -1).numpy(), rtol=1e-3, atol=1e-3)
    phi = grads["g"].parts(batch)[1]  # (5, 6, P)
    np.testing.assert_allclose(parts.caches["g"].load(), phi.reshape(30, -1).numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(parts.masks(), torch.stack([item["mask"] for item in images]).numpy())
    # reopened with one more gradient: only that one is computed
    more = {**grads, "h": FungiPatchFeatures(encoder, head_dim=4, objective="kl")}
    reopened = PartSet.open(tmp_path, ("train",), key, encoder, more, 5, (2, 3), batch=2, mask_size=(32, 48))
    assert [name for name, cache in reopened.caches.items() if cache.missing_rows()] == ["h"]
    computed = []
    more["h"].parts = lambda images, real=more["h"].parts: computed.append(len(images)) or real(images)
    more["g"].parts = lambda images: pytest.fail("g is cached")
    reopened.fill(images, encoder, more, torch.device("cpu"), "toy")
    assert computed == [2, 2, 1] and not reopened.caches["h"].missing_rows()


def test_tuned_comparisons_pick_each_rows_best_setting() -> None:
    scores = {("embeddings", 1, 0.1): np.array([0.5, 0.5]), ("embeddings", 2, 0.1): np.array([0.6, 0.6]),
              ("f", 1, 0.1): np.array([0.7, 0.9]), ("f", 2, 0.1): np.array([0.4, 0.4])}
    rows = [{"row": name, "k": k, "temperature": t, "score": float(values.mean())}
            for (name, k, t), values in scores.items()]
    draws = np.array([[0, 1], [0, 0], [1, 1]])  # mean differences 0.2, 0.1, 0.3
    embeddings, tuned = tuned_comparisons(rows, scores, draws)
    assert (embeddings["k"], embeddings["difference"], embeddings["excludes_zero"]) == (2, 0.0, False)
    assert (tuned["row"], tuned["k"], tuned["embeddings_k"]) == ("f", 1, 2)
    assert tuned["score"] == pytest.approx(0.8) and tuned["difference"] == pytest.approx(0.2)
    assert tuned["low"] == pytest.approx(0.105) and tuned["high"] == pytest.approx(0.295)  # numpy's linear quantiles

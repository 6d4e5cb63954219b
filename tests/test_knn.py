"""kNN evaluation, PCA, few-shot rules, feature cache, classification datasets and run_knn end to end."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.neighbors import KNeighborsClassifier

from hummingbird_fungi.config.loader import load_config
from hummingbird_fungi.config.schema import KnnConfig, KnnOptions
from hummingbird_fungi.data.classification import load_classification, load_digits, stratified_split
from hummingbird_fungi.errors import ConfigError, DataError
from hummingbird_fungi.eval.knn import classification_metrics, few_shot_indices, knn_predict, reduce
from hummingbird_fungi.eval.knn_run import combinations, format_table, run_knn
from hummingbird_fungi.features.cache import FeatureCache
from hummingbird_fungi.features.pca import Pca
from test_fungi_image import TinyBackbone


def clustered(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy class clusters (n, dim) float32 and labels (n,)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = rng.integers(0, classes, size=n)
    return (centres[labels] + 1.5 * rng.normal(size=(n, dim))).astype(np.float32), labels


# --------------------------------------------------------------------------- kNN and PCA


def test_uniform_knn_matches_sklearn() -> None:
    train, train_labels = clustered(300, 16, 5, seed=0)
    test, _ = clustered(120, 16, 5, seed=1)
    expected = KNeighborsClassifier(n_neighbors=20).fit(train, train_labels).predict(test)
    got = knn_predict(torch.from_numpy(train), torch.from_numpy(train_labels), torch.from_numpy(test), 5, k=20)
    assert (got.numpy() == expected).mean() >= 0.99  # exact up to float ties in distances
    assert (got.numpy() == expected).sum() >= 119


def test_knn_votes_match_brute_force() -> None:
    train, train_labels = clustered(80, 6, 4, seed=2)
    test, _ = clustered(30, 6, 4, seed=3)
    temperature = 0.5
    for vote in ("uniform", "weighted"):
        got = knn_predict(torch.from_numpy(train), torch.from_numpy(train_labels), torch.from_numpy(test), 4,
                          k=7, vote=vote, temperature=temperature).numpy()
        for q, query in enumerate(test):
            d2 = ((train - query) ** 2).sum(1)
            nearest = np.argsort(d2, kind="stable")[:7]
            scores = np.zeros(4)
            for i in nearest:
                weight = np.exp(-(d2[i] - d2[nearest[0]]) / (2 * temperature))
                scores[train_labels[i]] += 1.0 if vote == "uniform" else weight
            assert got[q] == int(np.argmax(scores))


def test_weighted_vote_can_overrule_majority() -> None:
    train = torch.tensor([[0.0], [1.0], [1.1], [1.2]])
    labels = torch.tensor([0, 1, 1, 1])
    query = torch.tensor([[0.01]])
    assert knn_predict(train, labels, query, 2, k=4, vote="uniform").item() == 1
    assert knn_predict(train, labels, query, 2, k=4, vote="weighted", temperature=0.01).item() == 0


def test_pca_matches_sklearn_up_to_sign() -> None:
    train, _ = clustered(200, 24, 3, seed=4)
    test, _ = clustered(50, 24, 3, seed=5)
    reference = PCA(n_components=8, svd_solver="full", random_state=42).fit(train)
    components = Pca.fit(torch.from_numpy(train), 8).axes.T.numpy()  # (8, D)
    signs = np.sign((components * reference.components_).sum(1))
    assert np.allclose(components * signs[:, None], reference.components_, atol=1e-4)
    ours = reduce(torch.from_numpy(train), torch.from_numpy(test), 8)[1].numpy()
    assert np.allclose(ours * signs, reference.transform(test), atol=1e-3)


def test_pca_follows_the_reference_rule() -> None:
    train, test = torch.randn(50, 16), torch.randn(10, 16)
    assert reduce(train, test, 512)[2] is None  # 512 >= n_train and >= D: no PCA
    assert reduce(train, test, 16)[2] is None  # not smaller than D
    assert reduce(train, test, None)[2] is None
    reduced_train, reduced_test, used = reduce(train, test, 8)
    assert used == 8 and reduced_train.shape == (50, 8) and reduced_test.shape == (10, 8)


def test_classification_metrics_by_hand() -> None:
    predictions, labels = np.array([0, 0, 1, 1, 2, 0]), np.array([0, 0, 0, 1, 2, 2])
    metrics = classification_metrics(predictions, labels)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["mean_per_class_accuracy"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)


def test_few_shot_rules() -> None:
    labels = np.array([1, 0, 1, 0, 2, 1, 0, 1, 2, 2, 0, 1, 2, 0, 0, 1])
    first = few_shot_indices(labels, 2, "first")
    assert first.tolist() == [0, 1, 2, 3, 4, 8]
    draws = [few_shot_indices(labels, 2, "random", seed) for seed in (0, 1, 0)]
    assert np.array_equal(draws[0], draws[2])
    for draw in draws:
        assert np.bincount(labels[draw]).tolist() == [2, 2, 2]
    assert any(not np.array_equal(few_shot_indices(labels, 2, "random", s), draws[0]) for s in range(1, 6))
    with pytest.raises(ConfigError):
        few_shot_indices(labels, 2, "last")


def test_knn_config_checks_and_combinations() -> None:
    assert KnnOptions.from_mapping({"vote": "weighted"}).vote == ["weighted"]
    with pytest.raises(ConfigError, match="knn.kk"):
        KnnOptions.from_mapping({"kk": 3})
    with pytest.raises(ConfigError, match="knn.shots"):
        KnnOptions(shots=["full", 0])
    assert len(combinations(["emb", "kl", "dino", "simclr"], "all")) == 15
    assert combinations(["emb", "kl"], ["kl+emb"]) == [("kl", "emb")]
    with pytest.raises(ConfigError):
        combinations(["emb"], ["emb+dino"])


def test_format_table_has_one_line_per_combination() -> None:
    rows = [{"features": f, "shots": s, "few_shot_rule": None if s == "full" else "first", "vote": "uniform",
             "accuracy": 0.5, "mean_per_class_accuracy": 0.25} for f in ("emb", "emb+kl") for s in ("full", 5)]
    table = format_table(rows).splitlines()
    assert len(table) == 5 and "5-shot first" in table[1] and "50.00 / 25.00" in table[3]
    assert table[0].startswith("each cell: top-1 accuracy / mean per-class accuracy (%)")  # the column legend


# --------------------------------------------------------------------------- feature cache


def test_feature_cache_resumes_from_complete_chunks(tmp_path) -> None:
    key = {"backbone": "tiny", "objective": "kl"}
    data = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)
    cache = FeatureCache(tmp_path, ("tiny", "digits", "train", "kl"), key, 23, 3, chunk_size=10)
    assert [c[0] for c in cache.missing()] == [0, 1, 2]
    cache.put(0, data[:10])
    (cache.path / "chunk_00001.npy.tmp.npy").write_bytes(b"interrupted")  # a write that never finished
    resumed = FeatureCache(tmp_path, ("tiny", "digits", "train", "kl"), key, 23, 3, chunk_size=10)
    assert resumed.path == cache.path
    assert [(i, a, b) for i, a, b in resumed.missing()] == [(1, 10, 20), (2, 20, 23)]
    assert resumed.missing_rows() == 13
    for index, start, stop in list(resumed.missing()):
        resumed.put(index, data[start:stop])
    assert np.array_equal(resumed.load(), data)
    assert json.loads((cache.path / "manifest.json").read_text())["complete"] is True
    other = FeatureCache(tmp_path, ("tiny", "digits", "train", "kl"), {**key, "objective": "dino"}, 23, 3, 10)
    assert other.path != cache.path and other.missing_rows() == 23


def test_feature_cache_recomputes_bad_chunks_and_rejects_foreign_manifest(tmp_path) -> None:
    cache = FeatureCache(tmp_path, ("a", "b", "c", "d"), {"x": 1}, 4, 2, chunk_size=2)
    np.save(cache.path / "chunk_00000.npy", np.zeros((1, 2), dtype=np.float32))  # wrong shape
    assert [i for i, _, _ in cache.missing()] == [0, 1]
    with pytest.raises(ValueError):
        cache.put(1, np.zeros((3, 2)))
    (cache.path / "manifest.json").write_text(json.dumps({"key": {"x": 2}}))
    with pytest.raises(DataError, match="different key"):
        FeatureCache(tmp_path, ("a", "b", "c", "d"), {"x": 1}, 4, 2, chunk_size=2)


def test_feature_cache_stores_its_dtype_under_its_own_key(tmp_path) -> None:
    data = np.linspace(0, 1, 12, dtype=np.float32).reshape(6, 2)
    half = FeatureCache(tmp_path, ("a", "b"), {"x": 1}, 6, 2, chunk_size=4, dtype="float16")
    for index, start, stop in list(half.missing()):
        half.put(index, data[start:stop])
    assert half.load().dtype == np.float16 and np.array_equal(half.load(), data.astype(np.float16))
    assert half.manifest["dtype"] == "float16"
    single = FeatureCache(tmp_path, ("a", "b"), {"x": 1}, 6, 2, chunk_size=4)  # float32: the manifest of before
    assert single.path != half.path and "dtype" not in single.manifest and single.missing_rows() == 6


def test_feature_cache_in_memory() -> None:
    cache = FeatureCache(None, ("a",), {}, 3, 2, chunk_size=2)
    cache.put(0, np.ones((2, 2))), cache.put(1, np.zeros((1, 2)))
    assert cache.load().shape == (3, 2) and cache.path is None


# --------------------------------------------------------------------------- datasets


def test_digits_split_is_fixed_stratified_and_disjoint() -> None:
    train, test = load_digits("train"), load_digits("test")
    assert len(train) + len(test) == 1797 and len(train) == 1078
    assert train.identity() == load_digits("train").identity()
    assert set(train.files).isdisjoint(test.files)
    fractions = np.bincount(train.targets) / (np.bincount(train.targets) + np.bincount(test.targets))
    assert np.allclose(fractions, 0.6, atol=0.01)
    image, label = train[0]
    assert image.mode == "RGB" and image.size == (8, 8) and label == train.targets[0]
    with pytest.raises(DataError):
        load_digits("val")


def test_stratified_split_is_seeded() -> None:
    targets = np.repeat(np.arange(3), 10)
    first, second = stratified_split(targets, 0.5, 0), stratified_split(targets, 0.5, 0)
    assert np.array_equal(first["train"], second["train"]) and len(first["train"]) == 15


def test_imagefolder_and_missing_datasets(tmp_path) -> None:
    for split, count in (("train", 3), ("val", 2)):
        for name in ("cat", "dog"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (10, 12), (i * 40, 0, 0)).save(folder / f"{i}.png")
    train = load_classification("imagefolder", tmp_path, "train")
    assert len(train) == 6 and train.classes == ["cat", "dog"] and train.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert train[4][0].size == (10, 12)
    start = time.perf_counter()
    for kind in ("cifar10", "flowers102", "dtd", "pets", "eurosat", "food101", "cars", "aircraft", "imagenet", "cub"):
        with pytest.raises(DataError, match=str(tmp_path / "nothing")):
            load_classification(kind, tmp_path / "nothing", "train")
        with pytest.raises(DataError, match=str(tmp_path)):
            load_classification(kind, tmp_path, "train")  # a folder without that dataset's files
    assert time.perf_counter() - start < 10  # nothing waits on the network
    with pytest.raises(DataError, match="data.root"):
        load_classification("cifar10", None, "train")
    with pytest.raises(ConfigError, match="unknown data.kind 'mnist2'"):
        load_classification("mnist2", tmp_path, "train")


# --------------------------------------------------------------------------- run_knn end to end


@pytest.fixture
def tiny_backbones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make named backbones (`create_encoder("name")` loads them with `load_backbone`) tiny random ViTs."""
    monkeypatch.setattr("hummingbird_fungi.models.factory.load_backbone", lambda *args, **kwargs: TinyBackbone())


def tiny_config(tmp_path) -> KnnConfig:
    """Digits subset, 16 px, all objectives with few views, cached under tmp_path."""
    overrides = [
        "device=cpu", "model.input_size=16", "data.subset=40", "data.eval_subset=20",
        "data.num_workers=0", "data.batch_size=16", f"features.cache_dir={tmp_path}", "features.chunk_size=25",
        "features.kl.latent_dim=16", "features.dino.local_views=2", "features.dino.latent_dim=16",
        "features.simclr.stride_scale=1", "features.simclr.negatives=3", "features.simclr.latent_dim=8",
        "features.dino.batch_size=8", "features.simclr.batch_size=8", "knn.k=5", "knn.pca=8",
        "knn.vote=[uniform, weighted]", "knn.few_shot_rule=[first, random]", "knn.shots=[full, 2]",
        "knn.few_shot_seeds=[0, 1]", "knn.combinations=[emb, kl+dino, emb+kl+dino+simclr]",
    ]
    return load_config(None, overrides, schema=KnnConfig)


def test_run_knn_end_to_end_and_resume(tmp_path, tiny_backbones) -> None:
    config = tiny_config(tmp_path)
    results = run_knn(config)
    rows = results["results"]
    assert len(rows) == 3 * 2 * 3  # combinations x votes x (full, 2-shot first, 2-shot random)
    for row in rows:
        assert {"features", "shots", "accuracy", "mean_per_class_accuracy"} <= set(row)
        assert 0.0 <= row["accuracy"] <= 1.0
    assert {r["features"] for r in rows} == {"emb", "kl+dino", "emb+kl+dino+simclr"}
    full = next(r for r in rows if r["features"] == "emb+kl+dino+simclr" and r["shots"] == "full")
    assert full["pca"] == 8 and full["dim"] == 8
    assert results["throughput"]["dino"]["images"] == 60 and results["throughput"]["dino"]["views_per_image"] == 4
    json.dumps(results)
    again = run_knn(tiny_config(tmp_path))  # everything from the cache
    assert all(t["images"] == 0 for t in again["throughput"].values())
    assert [r["accuracy"] for r in again["results"]] == [r["accuracy"] for r in rows]


def test_run_knn_rejects_bad_settings(tmp_path, tiny_backbones) -> None:
    with pytest.raises(ConfigError, match="square"):
        load_config(None, ["model.input_size=[16,24]"], schema=KnnConfig)
    with pytest.raises(ConfigError, match="features.kl.temprature"):
        load_config(None, ["features.kl.temprature=3"], schema=KnnConfig)
    with pytest.raises(ConfigError, match="simclr"):
        run_knn(load_config(None, ["device=cpu", "knn.combinations=[emb+simclr]", "features.objectives=[kl]"],
                            schema=KnnConfig))
    assert KnnConfig().knn.k == 20

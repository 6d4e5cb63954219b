"""The feature transform stage (features.transform): a PCA (whitening) fitted on the raw memory rows, applied to
bank rows as they are read and to queries; against sklearn and a numpy recomputation of the whole pipeline,
stored with saved banks (one folder per recipe, never overwritten) and with saved segmenters."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.decomposition import PCA

from hummingbird_fungi.cli.main import main
from hummingbird_fungi.config.schema import FeatureOptions, RetrievalOptions, TransferOptions, TransformOptions
from hummingbird_fungi.errors import ConfigError, DataError
from hummingbird_fungi.eval.hbird import run_hbird
from hummingbird_fungi.features.transform import (FeatureTransform, TransformedFeatures, transform_identity,
                                                  transform_key)
from hummingbird_fungi.memory.bank import MemoryBank
from hummingbird_fungi.memory.build import feature_transform, transform_folder
from hummingbird_fungi.retrieval.indexes import FaissTrainedIndex
from hummingbird_fungi.retrieval.transfer import LabelTransfer
from hummingbird_fungi.segment.segmenter import InContextSegmenter
from optional_packages import requires_faiss
from test_pipeline import TINY, assert_scores_recomputed, config, unit

WHITE = ["features.transform.pca=true", "features.transform.dims=16", "memory.size=null"]  # 96 rows of 192 dims
SEGMENT = ["--backbone", "vit_tiny_patch16_224", "--random-init", "--input-size", "64x64", "--device", "cpu",
           "--k", "5"]


def correlated(n: int = 2000, width: int = 6, seed: int = 0) -> np.ndarray:
    """Rows (n, width) with distinct variances and a non-zero mean."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(width, width)) * np.geomspace(5.0, 0.1, width)[:, None]
    return rng.normal(size=(n, width)) @ mixing + rng.normal(size=width)


def numpy_pca(rows: np.ndarray, dims: int, whiten: bool = True, epsilon: float = 0.0):
    """x -> (x - mean) @ top axes (/ sqrt(eigenvalue + epsilon)), fitted with numpy's covariance."""
    values, vectors = np.linalg.eigh(np.cov(rows, rowvar=False))
    axes, values, mean = vectors[:, ::-1][:, :dims], values[::-1][:dims], rows.mean(0)
    scale = 1 / np.sqrt(values + epsilon) if whiten else 1.0
    return lambda x: (x - mean) @ axes * scale


def same_up_to_signs(got: np.ndarray, expected: np.ndarray, atol: float) -> None:
    """Equal columns up to the sign of each (principal axes have no sign; unit rows stay unit under flips)."""
    signs = np.sign((got * expected).sum(0))
    np.testing.assert_allclose(got * signs, expected, atol=atol)


# --------------------------------------------------------------------------- the transform


@pytest.mark.parametrize("whiten", [True, False])
def test_transform_is_sklearn_pca_normalised(whiten):
    x = correlated()
    transform = FeatureTransform.fit(torch.from_numpy(x).float(), TransformOptions(pca=True, dims=4, whiten=whiten), 0)
    reference = PCA(4, whiten=whiten, svd_solver="full").fit(x)
    out = transform(torch.from_numpy(x).float())
    assert out.dtype == torch.float32 and out.shape == (len(x), 4) and transform.dim == 4
    same_up_to_signs(out.numpy(), unit(reference.transform(x)), atol=1e-5)
    arrays = transform.arrays()
    assert {name: array.shape for name, array in arrays.items()} == {
        "transform_mean": (6,), "transform_axes": (6, 4), **({"transform_scale": (4,)} if whiten else {})}
    assert all(array.dtype == np.float64 for array in arrays.values())
    batched = transform(torch.from_numpy(x[:12]).float().reshape(3, 4, 6))  # (..., D) -> (..., d)
    torch.testing.assert_close(batched.reshape(12, 4), out[:12])


def test_whitened_rows_have_identity_covariance_and_epsilon_shrinks_the_scale():
    x = torch.from_numpy(correlated())
    white = FeatureTransform.fit(x, TransformOptions(pca=True), seed=0)
    np.testing.assert_allclose(np.cov(white.pca(x).numpy(), rowvar=False), np.eye(6), atol=1e-10)  # before normalising
    values = np.linalg.eigvalsh(np.cov(x.numpy(), rowvar=False))[::-1]
    damped = FeatureTransform.fit(x, TransformOptions(pca=True, epsilon=0.5), seed=0)
    np.testing.assert_allclose(damped.pca.scale.numpy(), 1 / np.sqrt(values + 0.5), rtol=1e-10)
    same_up_to_signs(damped.pca(x).numpy(), numpy_pca(x.numpy(), 6, epsilon=0.5)(x.numpy()), atol=1e-10)
    assert damped.recipe == {"pca": True, "dims": None, "whiten": True, "epsilon": 0.5, "shrinkage": "none",
                             "fit_rows": 200000, "min_rows_per_dim": None, "seed": 0, "fitted_rows": 2000,
                             "input_dim": 6, "dim": 6}


@pytest.mark.parametrize("rows", [40, 2000])
def test_ledoit_wolf_whitening_is_sklearns_shrunk_covariance(rows):
    """Few rows of many dimensions (40 of 6 here; one example image's 768 patches of 384) give eigenvalues too small
    to whiten by; shrinkage scales by sklearn's Ledoit-Wolf covariance instead (biased there: times n / (n - 1))."""
    from sklearn.covariance import LedoitWolf

    x = correlated()[:rows]
    shrunk = FeatureTransform.fit(torch.from_numpy(x), TransformOptions(pca=True, shrinkage="ledoit_wolf"), seed=0)
    values = np.linalg.eigvalsh(LedoitWolf().fit(x).covariance_)[::-1] * rows / (rows - 1)
    np.testing.assert_allclose(shrunk.pca.scale.numpy(), 1 / np.sqrt(values), rtol=1e-8)
    plain = FeatureTransform.fit(torch.from_numpy(x), TransformOptions(pca=True), seed=0)
    assert (shrunk.pca.scale <= plain.pca.scale.max()).all() and shrunk.pca.scale[-1] < plain.pca.scale[-1]


def test_axes_are_limited_to_what_the_rows_span_and_dims_are_checked(caplog):
    x = torch.from_numpy(correlated(n=4, width=6))
    with caplog.at_level(logging.WARNING):
        transform = FeatureTransform.fit(x, TransformOptions(pca=True, dims=5), seed=0)
    assert transform.dim == 3 and "keeping the 3 axes they span" in caplog.text  # 4 centred rows span 3 axes
    assert torch.isfinite(transform(torch.randn(5, 6))).all()
    assert FeatureTransform.fit(x, TransformOptions(pca=True, whiten=False, dims=5), seed=0).dim == 5  # a rotation
    with pytest.raises(ConfigError, match="features.transform.dims=7 exceeds the feature size 6"):
        FeatureTransform.fit(x, TransformOptions(pca=True, dims=7), seed=0)
    for bad in ({"dims": 0}, {"epsilon": -1.0}, {"fit_rows": 0}):
        with pytest.raises(ConfigError, match=f"features.transform.{next(iter(bad))}"):
            TransformOptions(**bad)


def raw_bank(rows: int = 300, width: int = 12) -> MemoryBank:
    """An in-RAM bank of float16 unit rows in three blocks (labels: one-hot of 3 classes)."""
    features = unit(correlated(rows, width)).astype(np.float16)
    labels = np.eye(3, dtype=np.float16)[np.arange(rows) % 3]
    return MemoryBank(np.split(features, [100, 200]), np.split(labels, [100, 200]), {})


def test_the_fit_reads_raw_rows_and_the_transformed_bank_reads_transformed_rows():
    bank = raw_bank()
    options = TransformOptions(pca=True, dims=8, fit_rows=120)
    transform = feature_transform(bank, options, seed=5)
    assert transform.recipe["fitted_rows"] == 120 and transform.recipe["input_dim"] == 12
    again = feature_transform(bank, options, seed=5)
    other = feature_transform(bank, options, seed=6)
    assert torch.equal(again.pca.axes, transform.pca.axes) and not torch.equal(other.pca.mean, transform.pca.mean)
    sample = bank.sample_features(120, 5).double().numpy()  # the seeded uniform sample of raw rows it was fitted on
    same_up_to_signs(transform.pca(torch.from_numpy(sample)).numpy(), numpy_pca(sample, 8)(sample), atol=1e-9)

    white = bank.with_transform(transform)
    assert white.dim == 8 and white.stored_dim == 12 and bank.transform is None and bank.dim == 12
    assert white.feature_blocks is bank.feature_blocks  # rows shared, never rewritten
    assert torch.equal(feature_transform(white, options, seed=5).pca.axes, transform.pca.axes)  # fitted on raw rows
    chunks = list(white.feature_chunks())
    assert [chunk.dtype for chunk in chunks] == [np.float16] * 3
    expected = transform(torch.from_numpy(np.concatenate(bank.feature_blocks).astype(np.float32)))
    np.testing.assert_array_equal(np.concatenate(chunks), expected.numpy().astype(np.float16))
    ids = torch.tensor([[5, 250, 5], [299, 0, 150]])
    torch.testing.assert_close(white.gather_features(ids), expected[ids])
    torch.testing.assert_close(white.sample_features(50, 1), transform(bank.sample_features(50, 1)))


@requires_faiss
def test_a_trained_index_is_trained_on_transformed_rows(monkeypatch):
    bank = raw_bank()
    transform = feature_transform(bank, TransformOptions(pca=True, dims=8), seed=0)
    white, seen = bank.with_transform(transform), []
    fit = FaissTrainedIndex.fit
    monkeypatch.setattr(FaissTrainedIndex, "fit", lambda index, rows: (seen.append(rows), fit(index, rows))[1])
    transfer = LabelTransfer.from_bank(white, "faiss_ivfpq", k=5, nlist=4, nbits=4, train_size=100)
    torch.testing.assert_close(seen[0], transform(bank.sample_features(100)))  # not the raw 12-dim rows
    queries = white.gather_features(torch.arange(0, 300, 30))
    assert transfer.neighbours(queries)[1].shape == (10, 5)


# --------------------------------------------------------------------------- the pipeline


def test_whitened_pipeline_equals_a_numpy_recomputation(toy_dataset, tmp_path):
    bank = tmp_path / "bank"
    result = run_hbird(config(toy_dataset, "seed=3", f"memory.path={bank}", *WHITE))
    raw = np.concatenate(MemoryBank.load(bank).feature_blocks).astype(np.float64)
    assert result["memory"]["rows"] == 96 and result["memory"]["dim"] == 16
    assert result["features"]["dim"] == 192 and result["features"]["transform"]["dim"] == 16
    assert_scores_recomputed(result, toy_dataset, bank, 3, (64, 64), False, transform=numpy_pca(raw, 16))
    plain = run_hbird(config(toy_dataset, "seed=3", "memory.size=null"))
    assert "transform" not in plain["features"] and plain["memory"]["dim"] == 192
    assert plain["miou"] != result["miou"]


def test_a_saved_transform_is_reused_and_other_options_are_stored_beside_it(toy_dataset, tmp_path, monkeypatch,
                                                                           capsys):
    bank, out = tmp_path / "bank", tmp_path / "eval.json"
    args = [*TINY, f"data.root={toy_dataset}", f"memory.path={bank}", *WHITE]
    assert main(["build-memory", "--out", str(tmp_path / "build.json"), *args]) == 0
    folder = transform_folder(bank, transform_key(transform_identity(TransformOptions(pca=True, dims=16), 0)))
    stored = {file.name: file.read_bytes() for file in folder.iterdir()}
    assert set(stored) == {"transform.json", "transform_mean.npy", "transform_axes.npy", "transform_scale.npy"}
    assert json.loads(stored["transform.json"])["fitted_rows"] == 96

    def no_refit(*args, **kwargs):
        raise AssertionError("the stored transform was refitted")

    with monkeypatch.context() as patch:
        patch.setattr(FeatureTransform, "fit", no_refit)
        assert main(["evaluate", "--out", str(out), *args]) == 0
    in_ram = run_hbird(config(toy_dataset, *WHITE))
    reloaded = json.loads(out.read_text())
    assert reloaded["per_class_iou"] == in_ram["per_class_iou"] and reloaded["miou"] == in_ram["miou"]
    assert reloaded["features"]["transform"] == in_ram["features"]["transform"]

    other = main(["evaluate", "--out", str(out), *args, "features.transform.dims=8"])
    assert other == 0 and len(list((bank / "transforms").iterdir())) == 2
    assert {file.name: file.read_bytes() for file in folder.iterdir()} == stored  # never overwritten
    assert main(["evaluate", "--out", str(out), *args, "features.transform.pca=false"]) == 0
    assert json.loads(out.read_text())["miou"] == run_hbird(config(toy_dataset, "memory.size=null"))["miou"]

    recipe = json.loads(stored["transform.json"])
    (folder / "transform.json").write_text(json.dumps({**recipe, "epsilon": 0.5}))  # edited by hand
    with pytest.raises(DataError, match=r"(?s)records another recipe.*epsilon"):
        run_hbird(config(toy_dataset, f"memory.path={bank}", *WHITE))
    capsys.readouterr()


# --------------------------------------------------------------------------- the segmenter


def toy_files(root, split):
    images = sorted((root / "images" / split).glob("*.png"))
    return images, [root / "annotations" / split / image.name for image in images]


def test_segmenter_saves_and_reloads_its_transform(toy_dataset, tmp_path):
    images, masks = toy_files(toy_dataset, "train")
    queries, _ = toy_files(toy_dataset, "val")
    segmenter = InContextSegmenter.from_examples(
        images, masks, backbone="vit_tiny_patch16_224", pretrained=False, input_size=(64, 64), num_classes=3,
        ignore_index=3, device="cpu", retrieval=RetrievalOptions(k=5), transfer=TransferOptions(temperature=0.1),
        features=FeatureOptions(transform=TransformOptions(pca=True, dims=8)))
    assert isinstance(segmenter.extractor, TransformedFeatures) and segmenter.bank.dim == 8
    path = segmenter.save(tmp_path / "bank")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["transform"]["dim"] == 8 and manifest["features"]["dim"] == 192  # the stored rows stay raw
    assert (path / "transform_axes.npy").is_file() and np.load(path / "shards" / "00000.features.npy").shape[1] == 192
    loaded = InContextSegmenter.from_memory(path, device="cpu", retrieval=RetrievalOptions(k=5),
                                            transfer=TransferOptions(temperature=0.1))
    assert loaded.describe()["features"] == segmenter.describe()["features"]
    for query in queries:
        assert np.array_equal(loaded.predict(query), segmenter.predict(query))
        assert np.array_equal(loaded.predict_proba(query), segmenter.predict_proba(query))
    (path / "transform_scale.npy").unlink()
    with pytest.raises(DataError, match="lacks transform_scale"):
        InContextSegmenter.from_memory(path, device="cpu")


def test_segment_whiten_flags(toy_dataset, tmp_path, capsys):
    images = toy_dataset / "images" / "val"
    bank, first, second = tmp_path / "bank", tmp_path / "first", tmp_path / "second"
    assert main(["segment", "--examples", str(toy_dataset), "--images", str(images), "--out", str(first),
                 "--whiten", "--whiten-dims", "8", "--save-memory", str(bank), *SEGMENT]) == 0
    assert json.loads((first / "summary.json").read_text())["segmenter"]["features"]["transform"]["dim"] == 8
    assert main(["segment", "--memory", str(bank), "--images", str(images), "--out", str(second), "--device", "cpu",
                 "--k", "5"]) == 0
    for mask in (first / "masks").iterdir():
        assert np.array_equal(np.asarray(Image.open(mask)), np.asarray(Image.open(second / "masks" / mask.name)))
    capsys.readouterr()
    assert main(["segment", "--memory", str(bank), "--images", str(images), "--out", str(second), "--whiten"]) == 2
    assert "--whiten applies to a bank built from --examples" in capsys.readouterr().err
    assert main(["segment", "--examples", str(toy_dataset), "--images", str(images), "--out", str(second),
                 "--no-whiten", "--whiten-dims", "8", *SEGMENT]) == 2
    assert "--whiten-dims 8 needs --whiten" in capsys.readouterr().err


def test_config_show_lists_the_transform_keys(capsys):
    assert main(["config", "show", "camvid_dinov2_vits14", "features.transform.pca=true",
                 "features.transform.dims=64"]) == 0
    shown = capsys.readouterr().out
    for line in ("features.transform.pca: true", "features.transform.dims: 64", "features.transform.whiten: true",
                 "features.transform.epsilon: 0.0", "features.transform.fit_rows: 200000"):
        assert line in shown


def test_too_few_memory_rows_per_dimension_leave_the_features_raw(toy_dataset, caplog):
    """min_rows_per_dim (the user default: 10) skips whitening when the examples' rows are too few for their width:
    6 toy images x 16 patches = 96 rows of 192 features; a bound of 0.5 per feature lets it fit."""
    images, masks = toy_files(toy_dataset, "train")
    common = dict(backbone="vit_tiny_patch16_224", pretrained=False, input_size=(64, 64), num_classes=3,
                  ignore_index=3, device="cpu")
    raw = InContextSegmenter.from_examples(images, masks, **common, features=FeatureOptions(
        transform=TransformOptions(pca=True, min_rows_per_dim=10)))
    assert not isinstance(raw.extractor, TransformedFeatures) and raw.bank.dim == 192
    assert "96 memory rows of 192 features are fewer than features.transform.min_rows_per_dim=10" in caplog.text
    fitted = InContextSegmenter.from_examples(images, masks, **common, features=FeatureOptions(
        transform=TransformOptions(pca=True, min_rows_per_dim=0.5)))
    assert isinstance(fitted.extractor, TransformedFeatures)

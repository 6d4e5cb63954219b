"""Non-finite features (features.non_finite): one NaN or inf must never poison a whole evaluation.

Torch's top-k ranks NaN first, so a single bad bank row used to become every query's neighbour (mIoU
0.69 -> 0.19 on the toy scenes with one inf per batch). Bad rows are refused by default, naming the
images, or dropped with a warning.
"""

import logging

import numpy as np
import pytest
import torch

from hummingbird_fungi import FeatureOptions, hbird_evaluation
from hummingbird_fungi.errors import DataError
from hummingbird_fungi.eval import hbird
from hummingbird_fungi.memory.bank import MemoryBank
from hummingbird_fungi.retrieval.predict import QueryBatch, predict
from hummingbird_fungi.retrieval.transfer import LabelTransfer

OHE = {"dataset_name": "folder", "input_size": 64, "batch_size": 3, "num_workers": 0, "nn_method": "torch",
       "n_neighbours": 5, "memory_size": None, "device": "cpu"}


def colour(model, images):
    """Each 16 x 16 patch's mean colour (B, 16, 3): separates the toy scenes' sky, road and car."""
    return torch.nn.functional.avg_pool2d(images, 16).flatten(2).transpose(1, 2)


def one_inf(model, images):
    """`colour` with one inf in the first patch of each batch's first image."""
    features = colour(model, images).clone()
    features[0, 0, 0] = float("inf")
    return features


def evaluation(toy_dataset, feature_fn, **options):
    """(mIoU, details) of the toy dataset with `feature_fn`."""
    return hbird_evaluation(torch.nn.Identity(), 3, 16, data_dir=str(toy_dataset), ftr_extr_fn=feature_fn,
                            return_knn_details=True, **OHE, **options)


@pytest.fixture
def clean(toy_dataset) -> float:
    """mIoU of the clean colour features (0.685 measured)."""
    miou = evaluation(toy_dataset, colour)[0]
    assert miou > 0.6
    return miou


def test_a_bank_row_with_inf_is_refused_naming_the_image(toy_dataset):
    with pytest.raises(DataError) as error:
        evaluation(toy_dataset, one_inf)
    message = str(error.value)
    assert str(toy_dataset / "images" / "train" / "train000.png") in message and "1 of 16 rows" in message
    assert "features.non_finite=drop" in message


def test_drop_leaves_the_bad_rows_out_and_keeps_the_clean_score(toy_dataset, clean, caplog):
    with caplog.at_level(logging.WARNING, logger="hummingbird_fungi"):
        miou, details = evaluation(toy_dataset, one_inf, features=FeatureOptions(non_finite="drop"))
    # two bank batches (6 train images, batches of 3) and one query batch, one bad row each
    assert details["memory"]["rows"] == 6 * 16 - 2
    dropped = [r.getMessage() for r in caplog.records if "dropped (features.non_finite=drop)" in r.getMessage()]
    assert len(dropped) == 3 and all(m.startswith("NaN or inf in 1 ") for m in dropped)
    # measured: identical to the clean run (0.685); poisoned, without the guard, it was 0.186
    assert miou == pytest.approx(clean, abs=0.02)


def test_a_query_with_nan_is_refused_or_dropped(toy_dataset, clean, monkeypatch):
    poisoned = {"queries": False}

    def nan_in_queries(model, images):
        features = colour(model, images).clone()
        if poisoned["queries"]:
            features[1, 5, 2] = float("nan")
        return features

    def evaluate_bank(*args, **kwargs):  # the bank is clean; only the evaluation images are poisoned
        poisoned["queries"] = True
        return original(*args, **kwargs)

    original = hbird.evaluate_bank
    monkeypatch.setattr(hbird, "evaluate_bank", evaluate_bank)
    with pytest.raises(DataError, match="query feature") as error:
        evaluation(toy_dataset, nan_in_queries)
    assert f"query {toy_dataset / 'images' / 'val' / 'val001.png'}: 1 of 16 rows" in str(error.value)
    poisoned["queries"] = False
    miou, details = evaluation(toy_dataset, nan_in_queries, features=FeatureOptions(non_finite="drop"))
    assert details["memory"]["rows"] == 6 * 16 and miou == pytest.approx(clean, abs=0.02)


def test_a_dropped_query_patch_has_no_neighbours():
    """predict: the dropped patch gets zero features and an all-zero distribution; the others are unchanged."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(12, 4)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    labels = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 12)]
    transfer = LabelTransfer.from_bank(MemoryBank.from_arrays(features, labels, {}), k=3, temperature=0.1)
    queries = torch.from_numpy(features[:4] + 0.1).reshape(1, 4, 4)
    bad = queries.clone()
    bad[0, 2, 1] = float("nan")

    def run(batch_features, **options):
        batch = QueryBatch((2, 2), [(2, 2)], features=batch_features, keys=["q.png"])
        return next(predict([batch], transfer, **options))

    with pytest.raises(DataError, match=r"query q\.png: 1 of 4 rows"):
        run(bad)
    reference, dropped = run(queries), run(bad, non_finite="drop")
    assert (dropped.probs[2] == 0).all() and (dropped.features[2] == 0).all()
    keep = [0, 1, 3]
    assert torch.equal(dropped.probs[keep], reference.probs[keep]) and reference.probs[2].sum() > 0.99


def test_a_bank_whose_every_row_is_dropped_says_so(toy_dataset):
    def all_nan(model, images):
        return torch.full_like(colour(model, images), float("nan"))

    with pytest.raises(DataError, match="every feature row .* held NaN or inf and was dropped"):
        evaluation(toy_dataset, all_nan, features=FeatureOptions(non_finite="drop"))

"""The paired bootstrap CI of an mIoU difference, against a hand computation on 3 images and 2 classes."""

import numpy as np
import pytest

from hummingbird_fungi.eval.bootstrap import (compare, dataset_miou, paired_bootstrap, paired_bootstrap_means,
                                              resample_indices)

# per-image (2, 2) confusion matrices, rows ground truth, columns prediction
CMS_A = np.array([[[3, 1], [0, 4]],   # IoUs 3/4, 4/5
                  [[4, 0], [0, 4]],   # perfect
                  [[2, 2], [2, 2]]])  # IoUs 1/3, 1/3
CMS_B = np.array([[[4, 0], [0, 4]],
                  [[4, 0], [0, 4]],
                  [[3, 1], [1, 3]]])  # IoUs 3/5, 3/5
# five fixed resamples; level 0.5 asks for the 0.25 and 0.75 quantiles = sorted differences 1 and 3 of 0..4
INDICES = np.array([[0, 1, 2], [0, 0, 0], [1, 1, 1], [2, 2, 2], [0, 0, 2]])


def test_interval_matches_the_hand_computation():
    # summed matrices, by hand (IoU = TP / (row + column - TP)):
    #   [0,1,2]: a [[9,3],[2,10]] -> (9/14 + 10/15) / 2 = 55/84;  b [[11,1],[1,11]] -> 11/13
    #   [0,0,0]: a 0.775, b 1 -> 0.225;  [1,1,1]: 0;  [2,2,2]: 3/5 - 1/3 = 4/15
    #   [0,0,2]: a [[8,4],[2,10]] -> (8/14 + 10/16) / 2 = 67/112;  b [[11,1],[1,11]] -> 11/13
    full = 11 / 13 - 55 / 84        # 0.1914
    last = 11 / 13 - 67 / 112       # 0.2479
    # sorted differences: 0, full, 0.225, last, 4/15
    result = paired_bootstrap(CMS_A, CMS_B, level=0.5, indices=INDICES)
    assert result["difference"] == pytest.approx(full)
    assert result["miou_a"] == pytest.approx(55 / 84)  # the summed matrix, not the mean of per-image mIoUs
    assert result["miou_b"] == pytest.approx(11 / 13)
    assert result["low"] == pytest.approx(full)
    assert result["high"] == pytest.approx(last)
    assert result["n_resamples"] == 5 and result["n_valid"] == 5 and result["excludes_zero"]


def test_seeded_draw_is_reproducible_and_paired():
    first = paired_bootstrap(CMS_A, CMS_B, n_resamples=200, seed=3)
    assert first == paired_bootstrap(CMS_A, CMS_B, n_resamples=200, seed=3)
    assert first == {**paired_bootstrap(CMS_A, CMS_B, indices=resample_indices(3, 200, seed=3)), "seed": 3}
    assert first["low"] <= first["difference"] <= first["high"]
    same = paired_bootstrap(CMS_A, CMS_A, n_resamples=50)  # paired: identical variants never differ
    assert same["difference"] == same["low"] == same["high"] == 0.0 and not same["excludes_zero"]


def test_dataset_miou_is_the_toolkit_metric_and_bad_input_is_refused():
    assert dataset_miou(CMS_A.sum(0)) == pytest.approx(55 / 84)
    with pytest.raises(ValueError):
        paired_bootstrap(CMS_A, CMS_B[:2])
    with pytest.raises(ValueError):
        paired_bootstrap(CMS_A, CMS_B, level=1.0)
    with pytest.raises(ValueError):
        paired_bootstrap(CMS_A, CMS_B, indices=np.array([[0, 1, 3]]))


def test_means_interval_matches_the_hand_computation():
    # per-sequence scores; differences b - a = [0.1, 0.0, 0.3]
    a, b = np.array([0.5, 0.8, 0.2]), np.array([0.6, 0.8, 0.5])
    # resample means of the differences: [0,1,2] 0.4/3, [0,0,0] 0.1, [1,1,1] 0, [2,2,2] 0.3, [0,0,2] 0.5/3
    # sorted: 0, 0.1, 0.1333, 0.1667, 0.3; level 0.5 -> the 2nd and 4th
    result = paired_bootstrap_means(a, b, level=0.5, indices=INDICES)
    assert result["difference"] == pytest.approx(0.4 / 3)
    assert result["mean_a"] == pytest.approx(0.5) and result["mean_b"] == pytest.approx(1.9 / 3)
    assert result["low"] == pytest.approx(0.1) and result["high"] == pytest.approx(0.5 / 3)
    assert result["excludes_zero"] and result["n_units"] == 3
    with pytest.raises(ValueError, match="resample indices"):
        paired_bootstrap_means(a, b, indices=np.array([[0, 1, 3]]))


def test_compare_reads_matrices_as_mious_and_vectors_as_means():
    matrices = compare(CMS_A, CMS_B, INDICES)
    assert matrices["b"] == pytest.approx(11 / 13) and matrices["difference"] == pytest.approx(11 / 13 - 55 / 84)
    assert matrices["n_resamples"] == 5 and matrices["miou_a"] == pytest.approx(55 / 84)
    means = compare(np.array([0.5, 0.8, 0.2]), np.array([0.6, 0.8, 0.5]), INDICES)
    assert means["b"] == pytest.approx(1.9 / 3) and means["difference"] == pytest.approx(0.4 / 3)

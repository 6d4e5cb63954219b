"""Streaming confusion matrix and both mIoU readings against per-pixel brute force."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from hummingbird_fungi.eval.metrics import (ConfusionMatrix, iou_per_class, miou_reference, miou_standard,
                                       summarize)


def label_maps(count: int, classes: int, seed: int, shape=(6, 7)) -> list[torch.Tensor]:
    """Random integer label maps in [0, classes)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, classes, shape, generator=g) for _ in range(count)]


def brute_iou(preds, targets, classes: int, ignore=None) -> list[float]:
    """Per-class IoU by looping over pixels (NaN when a class is in neither GT nor predictions)."""
    tp, fp, fn = [0] * classes, [0] * classes, [0] * classes
    for p_map, t_map in zip(preds, targets):
        for p, t in zip(p_map.flatten().tolist(), t_map.flatten().tolist()):
            if t == ignore or not 0 <= t < classes:
                continue
            if p == t:
                tp[t] += 1
            else:
                fp[p] += 1
                fn[t] += 1
    return [tp[c] / (tp[c] + fp[c] + fn[c]) if tp[c] + fp[c] + fn[c] else math.nan for c in range(classes)]


def brute_reference(preds, targets, classes: int, ignore=None) -> float:
    """Reference mIoU by trying every relabelling of predictions (absent classes count 0)."""
    best = 0.0
    for perm in itertools.permutations(range(classes)):
        relabelled = [torch.tensor(perm)[p] for p in preds]
        iou = np.nan_to_num(brute_iou(relabelled, targets, classes, ignore), nan=0.0)
        best = max(best, float(iou.mean()))
    return best


def filled(preds, targets, classes: int, ignore=None) -> ConfusionMatrix:
    """A confusion matrix after one update per map."""
    cm = ConfusionMatrix(classes, ignore_index=ignore)
    for p, t in zip(preds, targets):
        cm.update(p, t)
    return cm


def test_streaming_equals_one_update_and_brute_force():
    preds, targets = label_maps(4, 5, 0), label_maps(4, 5, 1)
    cm = filled(preds, targets, 5)
    whole = filled([torch.cat(preds)], [torch.cat(targets)], 5)
    assert torch.equal(cm.matrix, whole.matrix)
    assert cm.matrix.dtype == torch.int64 and int(cm.matrix.sum()) == 4 * 42
    want = brute_iou(preds, targets, 5)
    np.testing.assert_allclose(iou_per_class(cm.matrix).numpy(), want)
    miou, per_class = miou_standard(cm.matrix)
    assert miou == pytest.approx(np.mean(want))
    np.testing.assert_allclose(per_class, want)


def test_reference_matches_exhaustive_relabelling():
    preds, targets = label_maps(3, 4, 2), label_maps(3, 4, 3)
    preds = [torch.where(p == 3, 1, p) for p in preds]  # class 3 never predicted
    cm = filled(preds, targets, 4)
    miou, per_class, assignment = miou_reference(cm.matrix)
    assert miou == pytest.approx(brute_reference(preds, targets, 4))
    assert sorted(assignment) == [0, 1, 2, 3]
    relabelled = [torch.tensor(assignment)[p] for p in preds]
    np.testing.assert_allclose(per_class, np.nan_to_num(brute_iou(relabelled, targets, 4), nan=0.0))


def test_hungarian_recovers_permutation_only_in_reference_mode():
    targets = label_maps(3, 5, 4)
    perm = torch.tensor([1, 2, 3, 4, 0])  # no fixed point
    preds = [perm[t] for t in targets]
    cm = filled(preds, targets, 5)
    miou, per_class, assignment = miou_reference(cm.matrix)
    assert miou == pytest.approx(1.0)
    assert [assignment[int(perm[c])] for c in range(5)] == list(range(5))
    assert miou_standard(cm.matrix)[0] == 0.0
    summary = summarize(cm, list("abcde"))
    assert summary["reference_relabelled"] == {"b": "a", "c": "b", "d": "c", "e": "d", "a": "e"}


def test_absent_classes_standard_vs_reference():
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1]])
    cm = filled([pred], [target], 4)  # classes 2 and 3 absent from GT and predictions
    miou, per_class = miou_standard(cm.matrix)
    assert miou == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert math.isnan(per_class[2]) and math.isnan(per_class[3])
    ref, ref_per_class, _ = miou_reference(cm.matrix)
    assert ref == pytest.approx((1 / 2 + 2 / 3) / 4)
    assert ref_per_class[2:] == [0.0, 0.0]


def test_voc_ignore_255_and_out_of_range_targets():
    preds, targets = label_maps(2, 3, 5), label_maps(2, 3, 6)
    noisy = [t.clone() for t in targets]
    noisy[0][0, :3] = 255
    noisy[1][2, 2] = -1
    noisy[1][3, 1] = 7  # out of range without being the ignore id: dropped too
    cm = filled(preds, noisy, 3, ignore=255)
    assert int(cm.matrix.sum()) == 2 * 42 - 5
    np.testing.assert_allclose(iou_per_class(cm.matrix).numpy(), brute_iou(preds, noisy, 3, ignore=255))
    assert miou_reference(cm.matrix)[0] == pytest.approx(brute_reference(preds, noisy, 3, ignore=255))


def test_invalid_inputs():
    cm = ConfusionMatrix(3, ignore_index=255)
    with pytest.raises(ValueError, match="predictions"):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="predictions"):
        cm.update(torch.tensor([0, 255]), torch.tensor([0, 255]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        cm.update(torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert int(cm.matrix.sum()) == 0


def test_ade_like_ignore_zero_and_exclude():
    classes = 4  # id 0 = "other", ignored in GT; 1..3 real classes
    preds, targets = label_maps(3, classes, 7), label_maps(3, classes, 8)
    cm = filled(preds, targets, classes, ignore=0)
    assert int(cm.matrix[0].sum()) == 0  # GT row 0 is always empty
    iou = brute_iou(preds, targets, classes, ignore=0)  # pred 0 on a labelled pixel: FN of its GT class
    assert iou[0] == 0.0  # predicted 0 somewhere, never right
    miou, per_class = miou_standard(cm.matrix, exclude=0)
    assert miou == pytest.approx(np.mean(iou[1:]))
    assert math.isnan(per_class[0])
    identity_ref = sum(iou[1:]) / classes  # ADE20K reference: sum over 1..C-1, divided by C
    ref = miou_reference(cm.matrix)[0]
    assert ref == pytest.approx(brute_reference(preds, targets, classes, ignore=0))
    assert ref >= identity_ref - 1e-12


def test_ade_reference_divides_by_all_classes_when_perfect():
    targets = label_maps(2, 4, 9)
    cm = filled(targets, targets, 4, ignore=0)
    assert miou_reference(cm.matrix)[0] == pytest.approx(3 / 4)
    assert miou_standard(cm.matrix, exclude=0)[0] == pytest.approx(1.0)


def test_merge_equals_single_matrix():
    preds, targets = label_maps(4, 5, 10), label_maps(4, 5, 11)
    first, second = filled(preds[:1], targets[:1], 5), filled(preds[1:], targets[1:], 5)
    first.merge(second)
    assert torch.equal(first.matrix, filled(preds, targets, 5).matrix)
    with pytest.raises(ValueError, match="merge"):
        first.merge(ConfusionMatrix(6))


def test_all_reduce_without_distributed_is_a_no_op():
    cm = filled(label_maps(1, 3, 12), label_maps(1, 3, 13), 3)
    before = cm.matrix.clone()
    cm.all_reduce()
    assert torch.equal(cm.matrix, before)


def test_summarize():
    target = torch.tensor([[0, 0, 1, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 2]])
    summary = summarize(filled([pred], [target], 3, ignore=255), ["bg", "cat", "dog"])
    assert summary["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert summary["miou_reference"] == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert summary["per_class_iou"] == {"bg": 0.5, "cat": pytest.approx(2 / 3), "dog": None}
    assert summary["per_class_iou_reference"]["dog"] == 0.0
    assert summary["pixel_accuracy"] == pytest.approx(3 / 4)
    assert summary["reference_relabelled"] == {}
    with pytest.raises(ValueError, match="class names"):
        summarize(ConfusionMatrix(3), ["bg"])


def test_all_reduce_with_a_single_gloo_rank(tmp_path):
    cm = filled(label_maps(1, 3, 14), label_maps(1, 3, 15), 3)
    before = cm.matrix.clone()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cm.all_reduce()
    finally:
        dist.destroy_process_group()
    assert torch.equal(cm.matrix, before)

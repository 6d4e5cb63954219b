"""Soft labels and the label-aware sampling rule (docs/protocol.md#label-aware-sampling) on hand-made label maps."""

import torch

from hummingbird_fungi.memory.labels import (label_aware_scores, patches_per_image, patchify_labels,
                                           sample_patches, soft_labels)

# 4x4 mask, patch 2 -> 2x2 grid. Patches (row-major): p0 all 0, p1 all 0, p2 {0, 1}, p3 {2, void}.
MASK = torch.tensor([[0, 0, 0, 0],
                     [0, 0, 0, 0],
                     [0, 1, 2, 2],
                     [1, 1, 2, 255]])


def test_patch_counts_row_major_and_void_rules():
    counts = patchify_labels(MASK[None], 2, 3, void_to_background=False)[0]
    assert counts.tolist() == [[4, 0, 0], [4, 0, 0], [1, 3, 0], [0, 0, 3]]
    counts_bg = patchify_labels(MASK[None], 2, 3, void_to_background=True)[0]
    assert counts_bg[3].tolist() == [1, 0, 3]  # 255 -> background as the VOC reference
    labels = soft_labels(counts)
    assert torch.allclose(labels[2], torch.tensor([0.25, 0.75, 0.0]))
    assert torch.allclose(labels[3], torch.tensor([0.0, 0.0, 1.0]))  # void left out, renormalised
    assert torch.allclose(soft_labels(counts_bg)[3], torch.tensor([0.25, 0.0, 0.75]))


def test_all_void_patch_has_zero_label():
    mask = torch.full((1, 2, 2), 255)
    assert soft_labels(patchify_labels(mask, 2, 3, False)).sum() == 0


def test_label_aware_scores_by_hand():
    counts = patchify_labels(MASK[None], 2, 3, void_to_background=False)[0]
    # freq: class0 in p0,p1,p2 = 3; class1 in p2 = 1; class2 in p3 = 1
    assert label_aware_scores(counts).tolist() == [3.0, 3.0, 4.0, 1.0]
    empty = torch.zeros(2, 3)
    empty[0, 1] = 2
    assert label_aware_scores(empty).tolist() == [1.0, 1e6]


def test_sample_patches_keeps_smallest_noisy_scores():
    counts = patchify_labels(MASK[None], 2, 3, void_to_background=False)[0]
    keep = sample_patches(counts, 2, "label_aware", torch.Generator().manual_seed(3))
    noise = torch.rand(4, generator=torch.Generator().manual_seed(3))
    expected = torch.topk(torch.tensor([3.0, 3.0, 4.0, 1.0]) * noise, 2, largest=False).indices.sort().values
    assert keep.tolist() == expected.tolist()


def test_label_aware_prefers_rare_patches():
    counts = patchify_labels(MASK[None], 2, 3, void_to_background=False)[0]
    hits = torch.zeros(4)
    for seed in range(400):
        hits[sample_patches(counts, 1, "label_aware", torch.Generator().manual_seed(seed))] += 1
    assert hits.argmax() == 3 and hits[3] > hits[2]
    uniform = torch.zeros(4)
    for seed in range(400):
        uniform[sample_patches(counts, 1, "uniform", torch.Generator().manual_seed(seed))] += 1
    assert uniform.min() > 60


def test_patches_per_image_matches_reference_table():
    # n_img of the reference settings: VOC trainaug, 512 px (1024 patches)
    assert patches_per_image(102400, 10582, 1, 1024) == 9
    assert patches_per_image(1024000, 10582, 2, 1024) == 48
    assert patches_per_image(10240000, 20210, 1, 1024) == 506
    assert patches_per_image(10240000, 10582, 1, 196) == 196  # clamped instead of crashing
    assert patches_per_image(10, 100, 1, 1024) == 1
    assert patches_per_image(None, 100, 1, 1024) == 1024

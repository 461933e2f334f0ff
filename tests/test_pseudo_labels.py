"""CM-SPLG pseudo-label selection on inputs whose answer is known."""

import numpy as np
import pytest
import torch

from cosod.pseudo_labels import (
    attention_mask,
    cluster_masks,
    mask_descriptor,
    select_pseudo_labels,
)


def block(r0, r1, c0, c1, shape=(8, 8)):
    m = np.zeros(shape, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def test_attention_mask_keeps_sixty_percent_of_the_mass():
    a = np.array([[0.5, 0.2], [0.2, 0.1]])  # masses 0.5, 0.2, 0.2, 0.1
    # 0.5 (before: 0) kept; next 0.2 (before: 0.5 < 0.6) kept; next 0.2 (before: 0.7) dropped
    assert attention_mask(a).tolist() == [[True, True], [False, False]]
    assert attention_mask(np.zeros((2, 2))).sum() == 1
    with pytest.raises(ValueError, match="mass must be in"):
        attention_mask(a, mass=0)


def test_clustering_groups_similar_descriptors():
    d = np.array([[1, 0, 0], [0.99, 0.1, 0], [0, 1, 0], [0, 0.98, 0.05], [0, 0, 1]], dtype=float)
    ids = cluster_masks(d / np.linalg.norm(d, axis=1, keepdims=True))
    assert ids[0] == ids[1] and ids[2] == ids[3]
    assert len({ids[0], ids[2], ids[4]}) == 3
    assert cluster_masks(np.zeros((0, 3))).size == 0 and cluster_masks(np.ones((1, 3))).tolist() == [0]


def test_descriptor_is_the_normalised_mean_token():
    tokens = torch.zeros(2, 2, 3)
    tokens[0, 0] = torch.tensor([3.0, 0, 0])
    tokens[0, 1] = torch.tensor([1.0, 0, 0])
    np.testing.assert_allclose(mask_descriptor(tokens, block(0, 1, 0, 2, (2, 2))), [1.0, 0, 0])


def test_selection_picks_the_planted_co_occurring_category():
    # categories: A (0) in all 4 images, B (1) in 3, C (2) in 2, D (3) only in image 0.
    # In image 0, D overlaps the attention best, but with k = 3 only A, B, C compete: A wins.
    A, B, C, D = block(0, 4, 0, 4), block(4, 8, 4, 8), block(0, 2, 6, 8), block(5, 8, 0, 3)
    sa0 = D | block(0, 1, 0, 1)  # mostly D, one patch of A
    candidates = [[A, B, C, D], [A, B, C], [A, B], [A]]
    categories = [[0, 1, 2, 3], [0, 1, 2], [0, 1], [0]]
    sa = [sa0, A, A, A]
    labels = select_pseudo_labels(candidates, categories, sa, k=3)
    assert [lab.category for lab in labels] == [0, 0, 0, 0]
    assert labels[0].frequency == 4 and labels[0].source == "category"
    assert np.array_equal(labels[0].mask, A)
    assert labels[0].overlap == pytest.approx(1 / 25)  # |A & sa0| = 1, |A | sa0| = 16 + 9
    # with k = 4 the rare but better-overlapping D is chosen in image 0
    wide = select_pseudo_labels(candidates, categories, sa, k=4)[0]
    assert wide.category == 3 and wide.overlap == pytest.approx(9 / 10)


def test_selection_fallbacks():
    A = block(0, 2, 0, 2)
    far = block(6, 8, 6, 8)
    labels = select_pseudo_labels([[A], []], [[0], []], [far, far])
    assert labels[0].source == "most-frequent" and np.array_equal(labels[0].mask, A)
    assert labels[1].source == "attention" and np.array_equal(labels[1].mask, far)


def test_masks_of_one_category_in_one_image_are_united():
    left, right = block(0, 8, 0, 2), block(0, 8, 6, 8)
    (label,) = select_pseudo_labels([[left, right]], [[5, 5]], [left])
    assert np.array_equal(label.mask, left | right) and label.category == 5


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="must match"):
        select_pseudo_labels([[]], [], [])


def test_pseudo_label_masks_survive_a_crf_failure_and_keep_the_image_size(monkeypatch, caplog):
    import cosod.refine as refine
    from cosod.backbones import build_backbone
    from cosod.data import synthetic_group
    from cosod.features import encode_images
    from cosod.pseudo_labels import pseudo_label_masks

    images, _ = synthetic_group(3, size=(50, 70), seed=1)
    feats = encode_images(build_backbone("tiny"), images)
    snapped, _ = pseudo_label_masks(images, feats)
    assert [m.shape for m in snapped] == [(50, 70)] * 3 and all(m.dtype == bool for m in snapped)

    def boom(*args, **kwargs):
        raise Exception("densecrf broke")

    monkeypatch.setattr(refine, "dense_crf", boom)
    plain, _ = pseudo_label_masks(images, feats, crf=False)
    fallen_back, _ = pseudo_label_masks(images, feats)
    assert "using the pseudo-label without CRF" in caplog.text
    for a, b in zip(plain, fallen_back, strict=True):
        assert np.array_equal(a, b)

"""Adaptive threshold, region refinement and dense CRF on inputs whose answer is known."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from cosod.refine import (
    CRFParams,
    component_grid_masks,
    crf_refine,
    dense_crf,
    group_prototype,
    group_threshold,
    map_confidences,
    map_thresholds,
    output_map,
    refine_regions,
    resize_mask,
    working_size,
)


def test_group_threshold_formula():
    # image 0: half the grid at 0.5, half at 0.1 (below the 0.15 floor) -> conf 0.5
    # image 1: all 0.9 -> conf 0.9; group conf 0.7 -> th = 0.505 + (1 - 0.7) - 0.48 = 0.325
    a = torch.full((28, 28), 0.1)
    a[:, :14] = 0.5
    b = torch.full((28, 28), 0.9)
    maps = torch.stack([a, b])  # already at the grid size: the resize is the identity
    assert group_threshold(maps, (28, 28)) == pytest.approx(0.325, abs=1e-6)
    assert group_threshold(maps[1:], (28, 28)) == pytest.approx(1.025 - 0.9, abs=1e-6)
    # a map with nothing above the floor counts conf 0
    assert group_threshold(torch.full((1, 28, 28), 0.1), (28, 28)) == pytest.approx(1.025, abs=1e-6)
    # other constants
    assert group_threshold(maps, (28, 28), th0=0.4, alpha_c=2.0, bm_bar=0.5) == pytest.approx(
        0.4 + 2.0 * (0.3 - 0.5), abs=1e-6
    )


def test_per_map_threshold_formula():
    m = torch.tensor([[[0.2, 0.2], [0.2, 0.8]], [[0.6, 0.6], [0.6, 0.6]]])
    # map 0: mean 0.35, pixels >= mean: {0.8} -> conf 0.8; map 1: all equal -> conf 0.6
    torch.testing.assert_close(map_confidences(m), torch.tensor([0.8, 0.6]))
    torch.testing.assert_close(map_thresholds(m), torch.tensor([0.505 + 0.2 - 0.48, 0.505 + 0.4 - 0.48]))
    torch.testing.assert_close(map_thresholds(m, bm_bar=0.3), torch.tensor([0.405, 0.605]))


def test_component_downsampling_samples_the_centre_of_each_cell():
    labels = np.zeros((16, 16), dtype=np.int64)
    labels[3:5, 3:5] = 1  # the whole 2x2 centre of cell (0, 0) -> kept
    labels[3:5, 11] = 2  # half of the centre of cell (0, 1) -> 0.5 rounds up -> kept
    labels[11, 11] = 3  # a quarter of the centre of cell (1, 1) -> 0.25 rounds down -> lost
    labels[8:11, 0:3] = 4  # a corner of cell (1, 0) that misses its centre -> lost
    out = component_grid_masks(labels, 4, (2, 2))
    assert out[0].tolist() == [[True, False], [False, False]]
    assert out[1].tolist() == [[False, True], [False, False]]
    assert not out[2].any() and not out[3].any()


def two_component_case():
    """Tokens on an 8x8 grid: component A (top left) carries the common feature c, component B (bottom
    right) an unrelated feature d; the binary mask at 64x64 covers both."""
    dim = 16
    c, d = torch.zeros(dim), torch.zeros(dim)
    c[0], d[1] = 1.0, 1.0
    tokens = torch.zeros(8, 8, dim)
    tokens[..., 2] = 1.0  # background
    tokens[0:3, 0:3] = c
    tokens[5:8, 5:8] = d
    binary = np.zeros((64, 64), dtype=bool)
    binary[0:24, 0:24] = True
    binary[40:64, 40:64] = True
    return tokens, binary, c, d


def test_refinement_drops_a_planted_non_matching_component():
    tokens, binary, c, _ = two_component_case()
    refined, decision = refine_regions(binary, tokens, prototype=c)
    assert decision.scores == [100, 0] and decision.kept == [0]
    assert refined[0:24, 0:24].all() and not refined[40:, 40:].any()


def test_refinement_keeps_regions_within_the_relative_margin():
    tokens, binary, c, d = two_component_case()
    # prototype halfway between c and d: both components score int(100 cos 45deg) = 70 -> both kept
    refined, decision = refine_regions(binary, tokens, prototype=c + d)
    assert decision.scores == [70, 70] and decision.kept == [0, 1]
    assert np.array_equal(refined, binary)


def test_refinement_when_no_component_scores_above_zero():
    tokens, binary, c, d = two_component_case()
    # scores [-100, 0]: best == 0, a division by zero in the official code: the thresholded mask is kept
    refined, decision = refine_regions(binary, tokens, prototype=-c)
    assert decision.scores == [-100, 0] and decision.fallback == "no-positive-score"
    assert decision.kept == [0, 1] and np.array_equal(refined, binary)
    # scores [-70, -70] (prototype -(c + d)): the official ratio s / best >= 0.77 keeps every component
    refined, decision = refine_regions(binary, tokens, prototype=-(c + d))
    assert decision.scores == [-70, -70] and decision.kept == [0, 1] and np.array_equal(refined, binary)
    # scores about [-80, -60]: still all, since s <= best < 0.77 * best for every s
    refined, decision = refine_regions(binary, tokens, prototype=-2 * c - 1.5 * d)
    assert decision.scores[0] < decision.scores[1] < 0 and decision.kept == [0, 1]
    # the named option keeps only the best component instead (method_spec A.6's proposal)
    refined, decision = refine_regions(binary, tokens, prototype=-c, fallback="best")
    assert decision.fallback == "no-positive-score" and decision.kept == [1]
    assert not refined[0:24, 0:24].any() and refined[40:, 40:].any()
    refined, decision = refine_regions(np.zeros((64, 64), bool), tokens, prototype=c)
    assert decision.fallback == "no-components" and not refined.any()
    with pytest.raises(ValueError, match="'official' or 'best'"):
        refine_regions(binary, tokens, prototype=c, fallback="first")


def test_group_prototype_skips_images_without_foreground():
    tokens = torch.stack([torch.ones(2, 2, 3), 3 * torch.ones(2, 2, 3), 100 * torch.ones(2, 2, 3)])
    masks = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    torch.testing.assert_close(group_prototype(tokens, masks), torch.full((3,), 2.0))
    assert not group_prototype(tokens, torch.zeros_like(masks)).any()


def edge_image(h=96, w=128, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 30, dtype=np.float64)
    truth = np.zeros((h, w), dtype=bool)
    truth[24:72, 40:96] = True
    img[truth] = (220, 200, 40)
    img += rng.normal(0, 2, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), truth


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_crf_snaps_a_blurred_mask_to_the_image_edge():
    img, truth = edge_image()
    # grown a few pixels past the object's edge, corners rounded (the hard-label unary of the official
    # settings corrects a band of a few pixels, not a wide one)
    rough = gaussian_filter(truth.astype(float), sigma=4) > 0.3
    assert iou(rough, truth) < 0.9
    snapped = dense_crf(img, rough, CRFParams())
    assert iou(snapped, truth) > 0.97


def test_crf_squashes_the_image_to_224_as_the_official_code_does():
    img, truth = edge_image(h=300, w=400)
    rough = gaussian_filter(truth.astype(float), sigma=8) > 0.3
    work = resize_mask(rough, (224, 224))
    out = crf_refine(img, work)
    assert out.shape == (224, 224) and out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}
    full = output_map(out, (300, 400)) > 127
    assert iou(full, truth) > iou(resize_mask(work, (300, 400)), truth)
    # the CRF image is OpenCV's INTER_LINEAR squash (no antialiasing): the official CRF input
    import cv2

    import cosod.refine as refine

    seen = {}

    def spy(image, mask, params=None):
        seen["image"] = image.copy()
        return mask

    original = refine.dense_crf
    refine.dense_crf = spy
    try:
        crf_refine(img, work)
    finally:
        refine.dense_crf = original
    assert np.array_equal(seen["image"], cv2.resize(img, (224, 224), interpolation=cv2.INTER_LINEAR))


def test_crf_keeping_the_aspect_ratio_is_a_named_option():
    img, truth = edge_image(h=300, w=400)
    rough = gaussian_filter(truth.astype(float), sigma=8) > 0.3
    params = CRFParams(max_side=160)
    assert working_size(300, 400, 160) == (120, 160)
    work = resize_mask(rough, (64, 64))
    out = crf_refine(img, work, params, aspect="keep")
    assert out.shape == (120, 160)
    full = output_map(out, (300, 400)) > 127
    assert iou(full, truth) > iou(resize_mask(work, (300, 400)), truth)
    with pytest.raises(ValueError, match="'squash' or 'keep'"):
        crf_refine(img, work, aspect="fit")


def test_an_all_foreground_crf_result_is_written_empty_as_the_official_code_does():
    flat = np.full((224, 224, 3), 128, np.uint8)
    everything = np.ones((224, 224), bool)
    assert dense_crf(flat, everything).all()  # the CRF itself keeps a uniform foreground
    assert not crf_refine(flat, everything).any()  # official min-max: 0 / 0, written as 0
    assert crf_refine(flat, everything, uniform="keep").all()  # the named option
    with pytest.raises(ValueError, match="'official' or 'keep'"):
        crf_refine(flat, everything, uniform="skip")


def test_output_map_is_opencvs_linear_resize_of_the_0_255_mask():
    # a 1x2 mask [0, 1] to 1x4: source positions 0, 0.25, 0.75, 1 (half-pixel centres, clamped)
    out = output_map(np.array([[0, 1]], np.uint8), (1, 4))
    assert out.tolist() == [[0, 64, 191, 255]]  # 63.75 and 191.25, rounded
    assert resize_mask(np.array([[False, True]]), (1, 4)).tolist() == [[False, False, True, True]]
    same = np.array([[1, 0], [0, 1]], np.uint8)
    assert output_map(same, (2, 2)).tolist() == [[255, 0], [0, 255]]


def test_empty_mask_stays_empty_after_crf():
    img, _ = edge_image()
    assert not dense_crf(img, np.zeros(img.shape[:2], bool)).any()

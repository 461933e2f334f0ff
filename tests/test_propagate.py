"""Propagation of corrections within a group, and the opt-in absence decision, on hand-made features.

Every group is planted: a 28x28 token grid (4x4 pixels per cell of a 112x112 image), C = 48 (the tiny
backbone's width, so the tiny pipeline's identity stage 1 runs on them). Background tokens are random; the
common object is a 7x7-cell block of tokens near direction ``o`` in every present image; a recurring
distractor is a larger 9x9-cell block near direction ``d`` with twice the norm. Stage 1 scores a token by its
similarity with the other images' tokens, so the unprompted pipeline picks the distractor (checked first).
"""

import numpy as np
import pytest
import torch

from cosod.absence import ABSENCE_Z, AbsenceDecision, best_region_similarity, decide_absence
from cosod.backbones import BackboneFeatures
from cosod.data import synthetic_group
from cosod.pipeline import Pipeline, PipelineConfig
from cosod.propagate import (
    correction_exemplars,
    correction_prototypes,
    neighbour_maps,
    propagate,
    prototype_maps,
)
from cosod.refine import RegionDecision

GRID, CELL, C = 28, 4, 48
SIDE = GRID * CELL


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def planted(n, *, absent=(), distractor=True, seed=0):
    """(feats, images, object masks, distractor masks) of a planted group; ``absent``: images without the
    object (their object mask is all False)."""
    rng = np.random.default_rng(seed)
    o = rng.standard_normal(C)
    o *= 4.0 / np.linalg.norm(o)
    d = rng.standard_normal(C)
    d -= (d @ o) / (o @ o) * o  # orthogonal to the object
    d *= 8.0 / np.linalg.norm(d)
    tokens = rng.standard_normal((n, GRID, GRID, C))
    images = rng.integers(100, 140, (n, SIDE, SIDE, 3)).astype(np.uint8)
    obj_masks, dis_masks = [], []
    for i in range(n):
        oy, ox = rng.integers(0, GRID - 7, 2)
        while True:
            dy, dx = rng.integers(0, GRID - 9, 2)
            if oy + 7 + 1 <= dy or dy + 9 + 1 <= oy or ox + 7 + 1 <= dx or dx + 9 + 1 <= ox:
                break
        cells_o = np.zeros((GRID, GRID), bool)
        cells_d = np.zeros((GRID, GRID), bool)
        if i not in absent:
            cells_o[oy : oy + 7, ox : ox + 7] = True
        if distractor:
            cells_d[dy : dy + 9, dx : dx + 9] = True
        tokens[i][cells_o] = o + 0.3 * rng.standard_normal((int(cells_o.sum()), C))
        tokens[i][cells_d] = d + 0.3 * rng.standard_normal((int(cells_d.sum()), C))
        pix_o = np.kron(cells_o, np.ones((CELL, CELL), bool))
        pix_d = np.kron(cells_d, np.ones((CELL, CELL), bool))
        images[i][pix_o] = (220, 40, 30)
        images[i][pix_d] = (30, 60, 230)
        obj_masks.append(pix_o)
        dis_masks.append(pix_d)
    t = torch.from_numpy(tokens).float()
    feats = BackboneFeatures(t, t.clone(), torch.zeros(n, GRID, GRID))
    return feats, list(images), obj_masks, dis_masks


@pytest.fixture(scope="module")
def fast():
    return Pipeline.build(PipelineConfig(backbone="tiny", crf=False), crf_workers=1)


@pytest.fixture(scope="module")
def with_crf():
    return Pipeline.build(PipelineConfig(backbone="tiny"), crf_workers=1)


def unprompted(pipe, feats, images):
    hashes = [f"h{i}" for i in range(len(images))]
    return pipe.masks_from_maps(images, pipe.head_maps([feats], hashes))


def test_the_unprompted_pipeline_picks_the_distractor(fast):
    feats, images, obj, dis = planted(8)
    pred = unprompted(fast, feats, images)
    for m, o, d in zip(pred.masks, obj, dis, strict=True):
        assert iou(m, d) > 0.7 and iou(m, o) < 0.1


def test_one_correction_switches_every_other_image_to_the_object(fast):
    feats, images, obj, dis = planted(8)
    out = propagate(fast, feats, images, {0: obj[0]})
    assert out.propagated and out.targets == list(range(1, 8))
    assert out.prediction is not None and out.prediction.mode == "propagated"
    for i in out.targets:
        m = out.masks[i]
        assert m.shape == images[i].shape[:2] and m.dtype == bool
        assert iou(m, obj[i]) > 0.8, i
        assert not (m & dis[i]).any(), i
        assert 0.5 < out.scores[i] <= 1.0
    assert set(out.timings) >= {"prototype", "refine", "crf", "total"}


def test_two_corrections_stay_right_and_refine_the_prototypes(fast):
    feats, images, obj, _ = planted(8, seed=1)
    one = propagate(fast, feats, images, {0: obj[0]})
    two = propagate(fast, feats, images, {0: obj[0], 5: obj[5]})
    assert two.targets == [1, 2, 3, 4, 6, 7]
    assert all(iou(two.masks[i], obj[i]) > 0.8 for i in two.targets)
    assert one.prototypes is not None and two.prototypes is not None
    assert two.prototypes.corrected == [0, 5]
    assert two.prototypes.fg_weight == pytest.approx(2 * one.prototypes.fg_weight)  # 49 cells each
    assert two.prototypes.bg_weight == pytest.approx(2 * (GRID * GRID - 49))


def test_prototypes_are_the_weighted_means_of_the_unit_tokens():
    tokens = torch.zeros(2, 2, 2, 3)
    tokens[0, 0, 0] = torch.tensor([2.0, 0, 0])  # cell fully under the mask
    tokens[0, 0, 1] = torch.tensor([0, 5.0, 0])  # half under it
    tokens[0, 1] = torch.tensor([0, 0, 3.0])
    tokens[1] = torch.tensor([0, 0, 1.0])
    mask = np.zeros((4, 4), bool)
    mask[0:2, 0:2] = True
    mask[0:2, 2] = True  # half of cell (0, 1)
    p = correction_prototypes(tokens, {0: mask, 1: np.zeros((6, 6), bool)})
    assert p.fg_weight == pytest.approx(1.5) and p.bg_weight == pytest.approx(0.5 + 2 + 4)
    torch.testing.assert_close(
        p.foreground, torch.nn.functional.normalize(torch.tensor([1.0, 0.5, 0]), dim=0)
    )
    torch.testing.assert_close(
        p.background, torch.nn.functional.normalize(torch.tensor([0, 0.5, 6.0]), dim=0)
    )
    maps = prototype_maps(tokens, p)
    assert maps.shape == (2, 2, 2) and maps.dtype == torch.float32
    assert float(maps[0, 0, 0]) == pytest.approx(float(torch.sigmoid(torch.tensor(0.35 / 0.15))), abs=1e-6)


def two_looks(seed=5):
    """A planted group whose object shows one look in the even images and another, orthogonal one in the odd
    images (the front and the back of a product)."""
    feats, images, obj, dis = planted(8, seed=seed)
    rng = np.random.default_rng(seed + 100)
    b = rng.standard_normal(C)
    o = feats.tokens[0][torch.from_numpy(obj[0][::CELL, ::CELL])].mean(0).numpy()
    for v in (o, feats.tokens[0][torch.from_numpy(dis[0][::CELL, ::CELL])].mean(0).numpy()):
        b -= (b @ v) / (v @ v) * v
    b *= 4.0 / np.linalg.norm(b)
    for i in range(1, 8, 2):
        cells = torch.from_numpy(obj[i][::CELL, ::CELL])
        noise = 0.3 * torch.from_numpy(rng.standard_normal((int(cells.sum()), C))).float()
        feats.tokens[i][cells] = torch.from_numpy(b).float() + noise
    return feats, images, obj, dis


def test_a_second_correction_adds_a_look_the_first_could_not_show(fast):
    feats, images, obj, _ = two_looks()
    one = propagate(fast, feats, images, {0: obj[0]}, targets=range(2, 8))
    two = propagate(fast, feats, images, {0: obj[0], 1: obj[1]}, targets=range(2, 8))
    for i in range(2, 8):
        assert iou(two.masks[i], obj[i]) > 0.8, i
        if i % 2 == 0:  # the look of the first correction: right from the start
            assert iou(one.masks[i], obj[i]) > 0.8, i
        else:  # the other look: found only once an image showing it is corrected
            assert iou(one.masks[i], obj[i]) < 0.2, i
    # the first design's single mean vector per side cannot tell: it stays behind on the second look
    proto = propagate(fast, feats, images, {0: obj[0], 1: obj[1]}, targets=range(2, 8), maps="prototype")
    assert np.mean([iou(two.masks[i], obj[i]) for i in range(3, 8, 2)]) >= np.mean(
        [iou(proto.masks[i], obj[i]) for i in range(3, 8, 2)]
    )


def test_neighbour_maps_give_each_token_the_labels_of_what_it_looks_like():
    tokens = torch.zeros(1, 2, 2, 3)
    tokens[0, 0, 0] = torch.tensor([3.0, 0, 0])  # like the foreground exemplar
    tokens[0, 0, 1] = torch.tensor([0, 0.5, 0])  # like the background one
    tokens[0, 1, 0] = torch.tensor([1.0, 1.0, 0])  # half way: as like one as the other
    tokens[0, 1, 1] = torch.tensor([0, 0, 1.0])  # like neither: equal weights
    exemplars = torch.eye(3)[:2]
    labels = torch.tensor([1.0, 0.0])
    maps = neighbour_maps(tokens, exemplars, labels, k=2, tau=0.1)
    e = float(torch.sigmoid(torch.tensor(10.0)))  # softmax of cosines (1, 0) / 0.1
    torch.testing.assert_close(maps[0], torch.tensor([[e, 1 - e], [0.5, 0.5]]))
    near = neighbour_maps(tokens, exemplars, labels, k=1)
    torch.testing.assert_close(near[0], torch.tensor([[1.0, 0.0], [1.0, 1.0]]))  # ties go to the first
    with pytest.raises(ValueError, match="no corrected foreground"):
        neighbour_maps(tokens, exemplars, torch.zeros(2))


def test_exemplars_are_bounded_and_labelled_by_the_foreground_fraction():
    tokens = torch.randn(3, 4, 4, 5)
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True  # the top-left 2x2 cells
    bank, labels = correction_exemplars(tokens, {2: mask, 0: np.zeros((8, 8), bool)})
    assert bank.shape == (32, 5) and labels.shape == (32,)
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(32))
    assert labels[:16].sum() == 0 and labels[16:].sum() == 4  # image 0 first, then image 2
    assert labels[16 + 0] == 1 and labels[16 + 5] == 1 and labels[16 + 2] == 0
    small, small_labels = correction_exemplars(tokens, {2: mask, 0: np.zeros((8, 8), bool)}, limit=5)
    assert small.shape == (5, 5) and len(small_labels) == 5
    torch.testing.assert_close(small[0], bank[0]) and torch.testing.assert_close(small[-1], bank[-1])


def test_an_unknown_map_kind_is_named(fast):
    feats, images, obj, _ = planted(3)
    with pytest.raises(ValueError, match="maps must be one of neighbours, prototype"):
        propagate(fast, feats, images, {0: obj[0]}, maps="nearest")


def test_an_empty_correction_counts_as_background(fast):
    feats, images, obj, dis = planted(8, absent=(3,), seed=2)
    out = propagate(fast, feats, images, {0: obj[0], 3: np.zeros(images[3].shape[:2], bool)})
    assert out.targets == [1, 2, 4, 5, 6, 7]
    assert all(iou(out.masks[i], obj[i]) > 0.8 for i in out.targets)
    assert out.prototypes is not None and out.prototypes.bg_weight == pytest.approx(2 * GRID * GRID - 49)
    # only "no object" corrections: nothing is propagated, nothing is made
    none = propagate(fast, feats, images, {3: np.zeros(images[3].shape[:2], bool)})
    assert not none.propagated and none.masks == {} and none.prediction is None
    assert none.targets == [0, 1, 2, 4, 5, 6, 7]


def test_chosen_targets_only(fast):
    feats, images, obj, _ = planted(6, seed=3)
    out = propagate(fast, feats, images, {1: obj[1]}, targets=[4, 2])
    assert out.targets == [4, 2] and set(out.masks) == {2, 4}
    assert iou(out.masks[4], obj[4]) > 0.8 and iou(out.masks[2], obj[2]) > 0.8


def test_through_the_crf(with_crf):
    feats, images, obj, dis = planted(6, seed=4)
    out = propagate(with_crf, feats, images, {0: obj[0]})
    assert out.timings["crf"] > 0
    for i in out.targets:
        assert iou(out.masks[i], obj[i]) > 0.8 and not (out.masks[i] & dis[i]).any(), i


@pytest.mark.parametrize(
    ("corrections", "message"),
    [
        ({9: np.zeros((SIDE, SIDE), bool)}, "correction index 9"),
        ({0: np.zeros((SIDE, SIDE - 1), bool)}, "mask is 112x111, the image is 112x112"),
        ({0: np.zeros((SIDE, SIDE, 3), bool)}, "expected an HxW bool mask"),
    ],
)
def test_bad_corrections_are_named(fast, corrections, message):
    feats, images, _, _ = planted(3)
    with pytest.raises(ValueError, match=message):
        propagate(fast, feats, images, corrections)


def test_features_must_match_the_group(fast):
    feats, images, obj, _ = planted(3)
    with pytest.raises(ValueError, match="features of 3 images for a group of 2"):
        propagate(fast, feats, images[:2], {0: obj[0]})


# ---------------------------------------------------------------------------------------------- absence


def test_decide_absence_known_answers():
    d = decide_absence([0.90, 0.92, 0.88, 0.91, 0.40, float("nan"), 0.80])
    assert isinstance(d, AbsenceDecision) and d.z_threshold == ABSENCE_Z
    # image 4: the others' median is 0.90, their MAD 0.02 (1.4826 * 0.02 < 0.05, so the spread is the floor
    # 0.05): z = -10, absent; the image without a region is absent; 0.80 is 0.10 below its others' median
    # 0.90: z = -2, present
    assert d.present == [True, True, True, True, False, False, True]
    assert d.absent == [4, 5]
    assert d.median[4] == pytest.approx(0.90) and d.spread[4] == pytest.approx(0.05)
    assert d.z[4] == pytest.approx(-10.0) and d.z[6] == pytest.approx(-2.0) and d.z[5] == -np.inf
    # too few others to compare with: nothing flagged
    assert decide_absence([0.9, 0.1, 0.9]).present == [True, True, True]
    assert best_region_similarity(RegionDecision([12, 87, -3], [1])) == pytest.approx(0.87)
    assert np.isnan(best_region_similarity(RegionDecision([], [], "no-components")))
    with pytest.raises(ValueError, match="must be > 0"):
        decide_absence([0.5], z_threshold=0)


def test_the_unprompted_pipeline_flags_planted_absent_images_when_asked():
    feats, images, obj, _ = planted(10, absent=(2, 7), distractor=False, seed=5)
    on = Pipeline.build(PipelineConfig(backbone="tiny", crf=False, absence=True), crf_workers=1)
    pred = unprompted(on, feats, images)
    assert pred.absence is not None and pred.absence.absent == [2, 7]
    for i in (2, 7):
        assert not pred.masks[i].any() and pred.scores[i] == 0.0
    assert all(iou(pred.masks[i], obj[i]) > 0.8 for i in range(10) if i not in (2, 7))
    off = Pipeline.build(PipelineConfig(backbone="tiny", crf=False), crf_workers=1)
    plain = unprompted(off, feats, images)
    assert plain.absence is None and plain.masks[2].any() and plain.masks[7].any()


def test_propagation_flags_planted_absent_images(fast):
    feats, images, obj, _ = planted(10, absent=(4, 8), seed=6)
    out = propagate(fast, feats, images, {0: obj[0]}, absence=True)
    assert out.absence is not None
    flagged = [out.targets[k] for k in out.absence.absent]
    assert flagged == [4, 8] and out.absent == [4, 8]
    assert not out.masks[4].any() and not out.masks[8].any()
    assert all(iou(out.masks[i], obj[i]) > 0.8 for i in out.targets if i not in (4, 8))
    off = propagate(fast, feats, images, {0: obj[0]})  # off unless asked
    assert off.absence is None and off.absent == []


def test_the_absence_option_is_off_by_default_and_versioned_only_when_on():
    base = Pipeline.build(PipelineConfig(backbone="tiny"))
    assert base.config.absence is False
    same = Pipeline.build(PipelineConfig(backbone="tiny", absence_z=2.0))  # ignored while off
    assert same.version_id == base.version_id
    on = Pipeline.build(PipelineConfig(backbone="tiny", absence=True))
    assert on.version_id != base.version_id
    with pytest.raises(ValueError, match="absence_z"):
        PipelineConfig(absence_z=0.0)


def test_predict_group_runs_the_decision_when_asked(fast):
    images, masks = synthetic_group(5, size=(48, 64), seed=3)
    assert fast.predict_group(images).absence is None
    pred = fast.predict_group(images, absence=True)
    assert pred.absence is not None and len(pred.absence) == 5
    for i in pred.absence.absent:
        assert not pred.masks[i].any() and pred.scores[i] == 0.0

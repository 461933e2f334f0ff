"""Pipeline: the documented edge cases, reference selection and the output contract."""

import numpy as np
import pytest
import torch

from cosod.features import image_hash
from cosod.pipeline import GroupPrediction, Pipeline, PipelineConfig, choose_references, reference_mask


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.build(PipelineConfig(backbone="tiny"))


def group(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 4 * i, 60 - 2 * i, 3), dtype=np.uint8) for i in range(n)]


def test_masks_soft_maps_and_scores_at_each_original_size(pipe):
    images = group(4)
    pred = pipe.predict_group(images)
    assert pred.mode == "group" and len(pred) == 4
    for img, mask, soft, score in zip(images, pred.masks, pred.soft, pred.scores, strict=True):
        assert mask.shape == img.shape[:2] and mask.dtype == bool
        assert soft.shape == img.shape[:2] and soft.dtype == np.float32
        assert 0.0 <= soft.min() and soft.max() <= 1.0
        assert 0.0 <= score <= 1.0
        assert score == (pytest.approx(float(soft[mask].mean())) if mask.any() else 0.0)
    assert set(pred.timings) >= {"backbone", "stage1", "refine", "crf", "total"}
    assert len(set(pred.thresholds)) == 1  # one threshold for the group (code form)


def test_empty_group(pipe):
    pred = pipe.predict_group([])
    assert isinstance(pred, GroupPrediction) and pred.mode == "empty" and len(pred) == 0


def test_group_of_one_uses_the_images_own_saliency(pipe):
    (img,) = group(1)
    pred = pipe.predict_group([img])
    assert pred.mode == "single" and pred.masks[0].shape == img.shape[:2]
    feats = pipe.encode([img])
    expected = torch.sigmoid((feats.cls_attention - 0.65) / 0.15)
    maps, refs = pipe.stage1_maps(feats, [image_hash(img)])
    assert refs == [0]
    torch.testing.assert_close(maps, expected)


def test_references_depend_on_content_not_order():
    hashes = ["d", "a", "c", "b", "e"]
    assert choose_references(hashes, 3) == [1, 2, 3]  # a, c, b
    assert choose_references(hashes, 5) == [0, 1, 2, 3, 4]
    m = reference_mask(4, [0, 1])
    assert m.tolist() == [
        [False, True, False, False],
        [True, False, False, False],
        [True, True, False, False],
        [True, True, False, False],
    ]


def test_large_group_compares_with_k_references_and_is_order_independent():
    pipe = Pipeline.build(PipelineConfig(backbone="tiny", max_refs=3, crf=False))
    images = group(6, seed=2)
    pred = pipe.predict_group(images)
    hashes = [image_hash(im) for im in images]
    assert pred.references == choose_references(hashes, 3) and len(pred.references) == 3
    order = [5, 3, 1, 0, 2, 4]
    shuffled = pipe.predict_group([images[i] for i in order])
    for j, i in enumerate(order):
        assert np.array_equal(shuffled.masks[j], pred.masks[i])
        np.testing.assert_allclose(shuffled.soft[j], pred.soft[i], atol=1e-5)


def test_predictions_are_deterministic_and_the_version_is_stable(pipe):
    images = group(3, seed=4)
    a, b = pipe.predict_group(images), pipe.predict_group(images)
    for x, y in zip(a.masks, b.masks, strict=True):
        assert np.array_equal(x, y)
    same = Pipeline.build(PipelineConfig(backbone="tiny"))
    assert same.version_id == pipe.version_id
    other = Pipeline.build(PipelineConfig(backbone="tiny", crf=False))
    assert other.version_id != pipe.version_id
    seeded = Pipeline.build(PipelineConfig(backbone="tiny", stage1_init="seeded"))
    assert seeded.version_id != pipe.version_id


def test_switches_and_per_map_threshold():
    pipe = Pipeline.build(PipelineConfig(backbone="tiny", threshold="map", refine=False, crf=False))
    pred = pipe.predict_group(group(3))
    assert len(pred.thresholds) == 3 and all(r is None for r in pred.regions)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "yolo"}, "unknown model"),
        ({"threshold": "otsu"}, "threshold must be"),
        ({"max_refs": 1}, "max_refs must be at least 2"),
        ({"stage1_init": "zeros"}, "stage1_init"),
        ({"feature_precision": "bfloat16"}, "'float32' or 'float16'"),
        ({"refine_fallback": "first"}, "refine_fallback must be one of 'official', 'best'"),
        ({"crf_aspect": "fit"}, "crf_aspect must be one of 'squash', 'keep'"),
        ({"crf_uniform": "drop"}, "crf_uniform must be one of 'official', 'keep'"),
    ],
)
def test_bad_config_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(**kwargs)


def test_bad_images_are_named(pipe):
    with pytest.raises(ValueError, match="image 1: expected an HxWx3 uint8 RGB array"):
        pipe.predict_group([group(1)[0], np.zeros((5, 5), np.uint8)])


def test_mask_maps_are_the_official_output_and_masks_binarise_them(pipe):
    images = group(3)
    pred = pipe.predict_group(images)
    for img, mask, mask_map in zip(images, pred.masks, pred.mask_maps, strict=True):
        assert mask_map.shape == img.shape[:2] and mask_map.dtype == np.uint8
        assert np.array_equal(mask, mask_map > 127)


def test_a_crf_failure_writes_the_whole_group_without_crf(monkeypatch, caplog):
    import cosod.refine as refine

    pipe = Pipeline.build(PipelineConfig(backbone="tiny"), crf_workers=1)  # the patched CRF runs here
    images = group(3)
    calls = []

    def flaky(image, mask, params=None):
        calls.append(1)
        if len(calls) == 2:
            raise Exception("densecrf broke")
        return np.ones_like(mask)

    monkeypatch.setattr(refine, "dense_crf", flaky)
    with_failure = pipe.predict_group(images)
    assert "the group is written without CRF" in caplog.text
    plain = Pipeline.build(PipelineConfig(backbone="tiny", crf=False)).predict_group(images)
    for a, b in zip(with_failure.mask_maps, plain.mask_maps, strict=True):
        assert np.array_equal(a, b)


def test_the_crf_workers_change_the_speed_not_the_masks_nor_the_version():
    images = group(5)
    one = Pipeline.build(PipelineConfig(backbone="tiny"), crf_workers=1)
    two = Pipeline.build(PipelineConfig(backbone="tiny"), crf_workers=2)
    assert Pipeline.build(PipelineConfig(backbone="tiny")).crf_workers >= 1
    assert one.version_id == two.version_id
    a, b = one.predict_group(images), two.predict_group(images)
    for x, y in zip(a.mask_maps, b.mask_maps, strict=True):
        assert np.array_equal(x, y)


def test_every_deliberate_difference_changes_the_version():
    base = Pipeline.build(PipelineConfig(backbone="tiny")).version_id
    for option in (
        {"feature_precision": "float16"},
        {"refine_fallback": "best"},
        {"crf_aspect": "keep"},
        {"crf_uniform": "keep"},
        {"backbone_amp": True},
    ):
        assert Pipeline.build(PipelineConfig(backbone="tiny", **option)).version_id != base, option

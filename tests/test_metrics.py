"""Tests for cosod.metrics: golden values against py_sod_metrics and hand-computed numbers."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from py_sod_metrics import MAE, Emeasure, Fmeasure, HumanCorrectionEffortMeasure, Smeasure

from cosod.metrics import METRIC_KEYS, CoSODEvaluator, format_table, iou, write_report

EPS = np.spacing(1)


def _square(value: int = 255, rows: slice = slice(5, 15), cols: slice = slice(5, 15)) -> np.ndarray:
    arr = np.zeros((20, 20), np.uint8)
    arr[rows, cols] = value
    return arr


def _fixtures() -> list[tuple[np.ndarray, np.ndarray]]:
    """Three 20x20 (pred, gt) pairs with hand-computable MAE, IoU and F."""
    gt = _square()
    # A: a binary square shifted 2 px right: TP 80, FP 20, FN 20
    shifted = _square(cols=slice(7, 17))
    # B: the object at 200, a 3x20 band of false positives at 100 (soft, does not reach 255)
    soft = _square(200)
    soft[0:3, :] = 100
    # C: empty ground truth, a 2x2 false positive
    blob = np.zeros((20, 20), np.uint8)
    blob[0:2, 0:2] = 255
    return [(shifted, gt), (soft, gt), (blob, np.zeros((20, 20), np.uint8))]


# hand-computed per-image values (raw MAE = mean |P/255 - G|; IoU of P >= 128 against G > 128)
MAE_A = 40 / 400
MAE_B = (100 * 55 / 255 + 60 * 100 / 255) / 400
MAE_C = 4 / 400
IOU_A, IOU_B, IOU_C = 80 / 120, 1.0, 0.0


def _evaluate(pairs, groups=None, **kwargs) -> dict:
    ev = CoSODEvaluator(**kwargs)
    for k, (pred, gt) in enumerate(pairs):
        ev.step(pred, gt, group=None if groups is None else groups[k], name=f"img{k}")
    return ev.results()


def _reference(pairs, normalize_mae: bool = False) -> dict:
    mae, em, sm, hce = MAE(), Emeasure(), Smeasure(alpha=0.5), HumanCorrectionEffortMeasure()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = Fmeasure(beta=0.3)
    for pred, gt in pairs:
        if normalize_mae:
            mae.step(pred, gt)
        else:
            mae.step(pred / 255.0, gt > 128, normalize=False)
        for metric in (fm, em, sm, hce):
            metric.step(pred, gt)
    f_curve, e_curve = fm.get_results()["fm"]["curve"], em.get_results()["em"]["curve"]
    return {
        "mae": mae.get_results()["mae"],
        "max_f": f_curve.max(),
        "mean_f": f_curve.mean(),
        "max_e": e_curve.max(),
        "mean_e": e_curve.mean(),
        "s_measure": sm.get_results()["sm"],
        "hce": hce.get_results()["hce"],
    }


@pytest.mark.parametrize("normalize_mae", [False, True])
def test_overall_equals_py_sod_metrics_called_directly(normalize_mae: bool) -> None:
    pairs = _fixtures()
    res = _evaluate(pairs, normalize_mae=normalize_mae)
    ref = _reference(pairs, normalize_mae=normalize_mae)
    for key, value in ref.items():
        assert res["overall"][key] == pytest.approx(float(value), abs=1e-12), key
    assert res["n_images"] == 3 and res["n_groups"] == 0 and res["groups"] == {}


def test_hand_computed_mae_iou_and_f() -> None:
    pairs = _fixtures()
    res = _evaluate(pairs)
    assert res["overall"]["mae"] == pytest.approx((MAE_A + MAE_B + MAE_C) / 3, abs=1e-12)
    assert res["overall"]["mae"] == pytest.approx(0.0742483660, abs=1e-9)
    assert res["overall"]["iou"] == pytest.approx(5 / 9, abs=1e-12)
    # PySODMetrics min-max normalises before MAE: B becomes {1 on the object, 0.5 on the band} -> 30/400
    normalised = _evaluate(pairs[1:2], normalize_mae=True)
    assert normalised["overall"]["mae"] == pytest.approx(0.075, abs=1e-12)

    only_a = _evaluate(pairs[:1])
    assert only_a["overall"]["mae"] == pytest.approx(0.1, abs=1e-12)
    assert only_a["overall"]["iou"] == pytest.approx(2 / 3, abs=1e-12)
    # binary prediction: every threshold k >= 1 selects the shifted square (P = R = 0.8, F = 0.8); threshold 0
    # selects everything (P = 0.25, R = 1, F = 1.3 * 0.25 / (0.3 * 0.25 + 1))
    f_all = 1.3 * 0.25 / (0.3 * 0.25 + 1)
    assert only_a["overall"]["max_f"] == pytest.approx(0.8, abs=1e-12)
    assert only_a["overall"]["mean_f"] == pytest.approx((255 * 0.8 + f_all) / 256, abs=1e-12)
    pr = only_a["pr_curve"]
    assert len(pr["precision"]) == len(pr["recall"]) == len(pr["thresholds"]) == 256
    assert pr["thresholds"][0] == 255 and pr["thresholds"][-1] == 0
    assert (pr["precision"][0], pr["recall"][0]) == pytest.approx((0.8, 0.8))
    assert (pr["precision"][-1], pr["recall"][-1]) == pytest.approx((0.25, 1.0))


def _e_measure(b: np.ndarray, g: np.ndarray) -> float:
    """The enhanced-alignment measure written out from its definition (Fan et al. 2018)."""
    phi_b, phi_g = b - b.mean(), g - g.mean()
    xi = 2 * phi_g * phi_b / (phi_g**2 + phi_b**2 + EPS)
    return float(np.sum((xi + 1) ** 2 / 4) / (b.size - 1 + EPS))


def test_e_measure_matches_its_definition_on_a_binary_map() -> None:
    pred, gt = _fixtures()[0]
    res = _evaluate([(pred, gt)])
    g = (gt > 128).astype(float)
    e_object = _e_measure((pred > 0).astype(float), g)  # thresholds 1..255
    e_all = _e_measure(np.ones_like(g), g)  # threshold 0
    assert res["overall"]["max_e"] == pytest.approx(max(e_object, e_all), abs=1e-12)
    assert res["overall"]["mean_e"] == pytest.approx((255 * e_object + e_all) / 256, abs=1e-12)


def test_perfect_prediction_and_bool_inputs() -> None:
    gt = _square()
    res = _evaluate([(gt > 0, gt > 0)])
    overall = res["overall"]
    assert overall["mae"] == 0.0 and overall["iou"] == 1.0 and overall["hce"] == 0.0
    assert overall["max_f"] == pytest.approx(1.0) and overall["s_measure"] == pytest.approx(1.0)
    assert res == _evaluate([(gt, gt)])


def test_averages_are_per_image_over_the_dataset_not_per_group() -> None:
    pairs = _fixtures()
    res = _evaluate(pairs, groups=["g1", "g2", "g2"])
    assert res["n_groups"] == 2
    assert res["groups"]["g1"]["n_images"] == 1 and res["groups"]["g2"]["n_images"] == 2
    assert res["groups"]["g1"]["mae"] == pytest.approx(MAE_A, abs=1e-12)
    assert res["groups"]["g2"]["mae"] == pytest.approx((MAE_B + MAE_C) / 2, abs=1e-12)
    assert res["groups"]["g2"]["iou"] == pytest.approx(0.5, abs=1e-12)
    # overall = mean over the 3 images, which differs from the mean of the 2 group means
    assert res["overall"]["mae"] == pytest.approx((MAE_A + MAE_B + MAE_C) / 3, abs=1e-12)
    assert res["overall"]["iou"] == pytest.approx(5 / 9, abs=1e-12)
    assert res["overall"]["iou"] != pytest.approx((IOU_A + (IOU_B + IOU_C) / 2) / 2)
    # each group's numbers equal an evaluation of that group alone
    alone = _evaluate(pairs[1:])["overall"]
    for key in METRIC_KEYS:
        assert res["groups"]["g2"][key] == pytest.approx(alone[key], abs=1e-12), key
    # the overall curve-based numbers are the reference's, over all three images
    assert res["overall"]["max_f"] == pytest.approx(float(_reference(pairs)["max_f"]), abs=1e-12)


def test_per_image_measures_are_each_image_evaluated_alone() -> None:
    pairs = _fixtures()
    ev = CoSODEvaluator()
    for k, (pred, gt) in enumerate(pairs):
        ev.step(pred, gt, group="g" if k else None, name=f"img{k}")
    rows = ev.per_image()
    assert [(r["group"], r["name"]) for r in rows] == [(None, "img0"), ("g", "img1"), ("g", "img2")]
    assert [r["mae"] for r in rows] == pytest.approx([MAE_A, MAE_B, MAE_C], abs=1e-12)
    assert [r["iou"] for r in rows] == pytest.approx([IOU_A, IOU_B, IOU_C], abs=1e-12)
    assert rows[0]["max_f"] == pytest.approx(0.8, abs=1e-12)  # the hand-computed F of image A
    for row, pair in zip(rows, pairs, strict=True):
        alone = _evaluate([pair])["overall"]
        for key in METRIC_KEYS:
            assert row[key] == pytest.approx(alone[key], abs=1e-12), key
    # the per-image means are the overall numbers, except max F / E (the max of the averaged curve)
    overall = ev.results()["overall"]
    for key in ("mae", "iou", "s_measure", "hce", "mean_f", "mean_e"):
        assert np.mean([r[key] for r in rows]) == pytest.approx(overall[key], abs=1e-12), key
    assert CoSODEvaluator().per_image() == []


def test_prediction_of_another_size_is_resized_bilinearly() -> None:
    gt = _square()
    small = np.zeros((10, 10), np.uint8)
    small[2:7, 3:8] = 255
    small[0, 0] = 90
    resized = np.asarray(Image.fromarray(small).resize((20, 20), Image.Resampling.BILINEAR))
    assert _evaluate([(small, gt)]) == _evaluate([(resized, gt)])


def test_results_are_json_serialisable() -> None:
    res = _evaluate(_fixtures(), groups=["a", "b", None])
    assert res["n_groups"] == 2 and "a" in res["groups"]  # the image without a group counts only overall
    assert json.loads(json.dumps(res, allow_nan=False)) == res


def test_step_validates_inputs() -> None:
    ev = CoSODEvaluator()
    gt = _square()
    with pytest.raises(ValueError, match=r"shape \(20, 20, 3\)"):
        ev.step(np.zeros((20, 20, 3), np.uint8), gt)
    with pytest.raises(TypeError, match="float64"):
        ev.step(np.zeros((20, 20)), gt)
    with pytest.raises(TypeError, match="list"):
        ev.step(gt, [[0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="group must be a str or None, got int 3"):
        ev.step(gt, gt, group=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no images were evaluated"):
        ev.results()
    ev.step(gt, gt, group="g", name="x")
    with pytest.raises(ValueError, match="'x' of group 'g' was already evaluated"):
        ev.step(gt, gt, group="g", name="x")
    assert len(ev) == ev.n_images == 1
    with pytest.raises(TypeError, match="normalize_mae"):
        CoSODEvaluator(normalize_mae="yes")  # type: ignore[arg-type]


def test_iou() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert iou(a, b) == 1.0  # both empty: perfect agreement by convention
    assert iou(a, b, empty=0.0) == 0.0  # as mask discovery and pseudo-labels count an empty pair
    a[0, :3] = True
    b[0, 1:] = True
    assert iou(a, b) == pytest.approx(0.5)
    assert iou(a, np.zeros((4, 4), bool)) == 0.0
    with pytest.raises(TypeError, match="uint8"):
        iou(a.astype(np.uint8), b)
    with pytest.raises(ValueError, match=r"\(4, 4\) vs gt_bool \(2, 2\)"):
        iou(a, np.zeros((2, 2), bool))


def test_format_table_and_write_report(tmp_path: Path) -> None:
    res = _evaluate(_fixtures(), groups=["alpha", "beta", "beta"])
    table = format_table(res)
    lines = table.splitlines()
    assert lines[0].split() == ["scope", "images", *METRIC_KEYS]
    assert lines[2].split()[:3] == ["overall", "3", f"{res['overall']['mae']:.4f}"]
    assert lines[4].split()[:2] == ["alpha", "1"] and lines[5].split()[:2] == ["beta", "2"]
    assert lines[4].split()[2 + METRIC_KEYS.index("iou")] == "0.6667"

    paths = write_report(res, tmp_path / "report")
    assert set(paths) == {"json", "txt", "png"}
    assert json.loads(paths["json"].read_text()) == res
    assert paths["txt"].read_text() == table
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(paths["png"]) as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
    with pytest.raises(ValueError, match="lacks the keys"):
        write_report({"overall": {}}, tmp_path)

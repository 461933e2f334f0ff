"""backend.labelstudio.regions: byte identity with the SDK's mask2rle, decoding, region dicts, polygons."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, encode_rle, mask2rle

from backend.labelstudio import regions as brush


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(1234)
    out = [
        np.zeros((1, 1), np.uint8),
        np.full((1, 1), 255, np.uint8),
        np.zeros((7, 3), np.uint8),
        np.full((5, 9), 255, np.uint8),
    ]
    for _ in range(150):  # random densities and sizes, incl. pure noise
        h, w = (int(v) for v in rng.integers(1, 48, size=2))
        out.append(((rng.random((h, w)) < rng.random()) * 255).astype(np.uint8))
    for _ in range(20):  # blobs
        h, w = (int(v) for v in rng.integers(20, 120, size=2))
        yy, xx = np.mgrid[:h, :w]
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(3, 40)
        out.append((((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) * 255).astype(np.uint8))
    # run lengths around the 4x-expanded class borders (2, 4, 16, 256) and the 65536 split
    for n in (2, 3, 4, 5, 63, 64, 65, 16383, 16384, 16385, 32768, 32769, 70000):
        out.append(np.full((1, n), 255, np.uint8))
        m = np.zeros((1, n + 3), np.uint8)
        m[0, 1 : n + 1] = 255
        out.append(m)
    big = np.zeros((300, 700), np.uint8)  # 4*210000 zeros then a run: several splits
    big[250:, 100:] = 255
    out.append(big)
    return out


@pytest.mark.parametrize("index", range(len(_masks())))
def test_mask_to_rle_is_byte_identical_to_sdk(index: int) -> None:
    mask = _masks()[index]
    assert brush.mask_to_rle(mask) == mask2rle(mask)


def test_noise_megapixel_identical_and_decodes() -> None:
    rng = np.random.default_rng(7)
    mask = ((rng.random((512, 512)) < 0.5) * 255).astype(np.uint8)
    rle = brush.mask_to_rle(mask)
    assert rle == mask2rle(mask)
    assert np.array_equal(brush.rle_to_mask(rle, 512, 512), mask)


def test_encode_rle_general_values_match_sdk() -> None:
    rng = np.random.default_rng(3)
    for _ in range(30):  # runs of length 1 (class-0 single tokens) only happen with raw 1-D input
        arr = rng.integers(0, 4, size=int(rng.integers(1, 400))) * 60
        assert brush.encode_rle(arr) == encode_rle(arr)
    long_single = np.array([7] * 200000 + [9] + [7] * 3)
    assert brush.encode_rle(long_single) == encode_rle(long_single)


def test_bool_mask_equals_255_mask_and_roundtrip() -> None:
    m = np.zeros((33, 21), bool)
    m[5:20, 3:15] = True
    rle = brush.mask_to_rle(m)
    assert rle == mask2rle(m.astype(np.uint8) * 255)
    decoded = np.asarray(decode_rle(rle)).reshape(33, 21, 4)
    assert (decoded[..., 3] == m * 255).all() and (decoded[..., 0] == m * 255).all()


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        brush.mask_to_rle(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="0..255"):
        brush.encode_rle(np.array([0, 300]))


def test_brush_region_shape() -> None:
    m = np.zeros((40, 60), bool)
    m[10:30, 20:50] = True
    r = brush.brush_region(m, from_name="tag", to_name="image", label="Object", score=0.5, rid="abc")
    assert r["type"] == "brushlabels" and r["original_width"] == 60 and r["original_height"] == 40
    assert r["value"]["brushlabels"] == ["Object"] and r["value"]["format"] == "rle"
    assert np.array_equal(brush.rle_to_mask(r["value"]["rle"], 40, 60) > 0, m)


def test_polygons_cover_each_part() -> None:
    m = np.zeros((100, 200), bool)
    m[10:50, 20:80] = True  # 2400 px
    m[60:90, 120:150] = True  # 900 px
    m[0:2, 198:200] = True  # 4 px: dropped
    polys = brush.mask_to_polygons(m)
    assert len(polys) == 2
    xs = [p[0] for p in polys[0]]
    ys = [p[1] for p in polys[0]]
    assert min(xs) == pytest.approx(10.0, abs=1.0) and max(xs) == pytest.approx(40.0, abs=1.0)
    assert min(ys) == pytest.approx(10.0, abs=1.5) and max(ys) == pytest.approx(50.0, abs=1.5)
    regions = brush.polygon_regions(m, from_name="poly", to_name="image", label="Object", score=0.9, rid="r")
    assert [r["type"] for r in regions] == ["polygonlabels"] * 2
    assert regions[0]["value"]["closed"] is True and regions[0]["value"]["polygonlabels"] == ["Object"]

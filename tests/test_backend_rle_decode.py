"""The numpy RLE decoder gives exactly the SDK's decode_rle output, faster."""

from __future__ import annotations

import time

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle as sdk_decode_rle

from backend.labelstudio.regions import decode_rle, encode_rle, mask_to_rle, rle_header, rle_to_mask_fast


def _bits_to_bytes(bits: str) -> list[int]:
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


def _header(count: int) -> str:
    return f"{count:032b}" + f"{7:05b}" + "".join(f"{b - 1:04b}" for b in (3, 4, 8, 16))


def test_identical_to_sdk_on_many_masks() -> None:
    rng = np.random.default_rng(7)
    cases = [np.zeros((5, 7), bool), np.ones((3, 3), bool), np.zeros((300, 300), bool)]
    big = np.zeros((400, 400), bool)
    big[50:350, 20:390] = True  # runs far longer than 65536 elements (4 per pixel)
    cases.append(big)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 80, 2))
        cases.append(rng.random((h, w)) < rng.random())  # noise of any density
    yy, xx = np.mgrid[:120, :160]
    cases.append((yy - 60) ** 2 + (xx - 80) ** 2 < 40**2)
    for m in cases:
        rle = mask_to_rle(m)
        ours = decode_rle(rle)
        assert ours.dtype == np.uint8
        assert np.array_equal(ours, sdk_decode_rle(rle))
        assert np.array_equal(rle_to_mask_fast(rle, *m.shape) > 0, m)


def test_identical_on_arbitrary_values() -> None:
    rng = np.random.default_rng(3)
    for _ in range(30):
        values = rng.integers(0, 256, int(rng.integers(1, 3000))).astype(np.uint8)
        values[: values.size // 2] = 17  # one long run, then noise
        rle = encode_rle(values)
        assert np.array_equal(decode_rle(rle), sdk_decode_rle(rle))
        assert np.array_equal(decode_rle(rle), values)


def test_literal_tokens_of_several_values() -> None:
    # a hand-built stream: a literal token of 3 values (flag 0, class 1 = 4 bits, length-1 = 2), then a run
    # of 5 (flag 1, class 0 = 3 bits, length-1 = 4) of value 9; our encoder never writes multi-value literals
    bits = _header(8) + "0" + "01" + "0010" + f"{1:08b}{2:08b}{250:08b}" + "1" + "00" + "100" + f"{9:08b}"
    rle = _bits_to_bytes(bits)
    assert decode_rle(rle).tolist() == [1, 2, 250, 9, 9, 9, 9, 9]
    assert np.array_equal(decode_rle(rle), sdk_decode_rle(rle))


def test_bad_input_is_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="0..255"):
        decode_rle([0, 300, 1])
    with pytest.raises(ValueError, match="header"):
        decode_rle([1, 2])
    rle = mask_to_rle(np.ones((20, 20), bool))
    with pytest.raises(ValueError, match="4\\*10\\*10"):
        rle_to_mask_fast(rle, 10, 10)
    truncated = _bits_to_bytes(_header(1000) + "1" + "00" + "111" + "00000001")
    with pytest.raises(ValueError, match="truncated"):
        decode_rle(truncated)


def test_faster_than_the_sdk() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:512, :512]
    blobby = ((yy // 37 + xx // 53) % 3 == 0) | (rng.random((512, 512)) < 0.01)
    noise = rng.random((256, 256)) < 0.5
    for m in (blobby, noise):
        rle = mask_to_rle(m)
        t0 = time.perf_counter()
        ours = decode_rle(rle)
        t1 = time.perf_counter()
        ref = sdk_decode_rle(rle)
        t2 = time.perf_counter()
        assert np.array_equal(ours, ref)
        print(f"{m.shape} mask, {len(rle)} bytes: numpy {t1 - t0:.3f} s, SDK {t2 - t1:.3f} s")
        assert t1 - t0 < t2 - t1


def test_rle_header_reads_the_claim_without_decoding() -> None:
    m = np.zeros((30, 41), bool)
    m[3:9, 5:30] = True
    assert rle_header(mask_to_rle(m)) == (4 * 30 * 41, 8)
    assert rle_header(_bits_to_bytes(_header(2**32 - 1))) == (2**32 - 1, 8)  # a header alone: no decoding
    assert rle_header(_bits_to_bytes(f"{5:032b}" + f"{15:05b}" + "0" * 16)) == (5, 16)
    for bad in ("abc", [1, 2, 3], [0, 0, 0, 256, 0, 0, 0], [True] * 7, {"rle": 1}):
        with pytest.raises(ValueError, match="RLE"):
            rle_header(bad)

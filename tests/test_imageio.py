"""Image decoding: limits before decoding, EXIF orientation, modes converted to 8-bit RGB."""

import io

import numpy as np
import pytest
from PIL import Image

from cosod.errors import ImageReadError
from cosod.imageio import decode_image, read_image, read_mask, write_mask


def encode(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgb_png_round_trip():
    arr = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(arr)))
    assert out.dtype == np.uint8 and np.array_equal(out, arr)


@pytest.mark.parametrize(
    "img, expected_pixel",
    [
        (Image.new("L", (4, 3), 77), (77, 77, 77)),
        (Image.new("RGBA", (4, 3), (10, 20, 30, 255)), (10, 20, 30)),
        (Image.new("RGBA", (4, 3), (10, 20, 30, 0)), (255, 255, 255)),  # transparent -> white
        (Image.fromarray(np.full((3, 4), 65535, np.uint16)), (255, 255, 255)),  # 16-bit grey
        (Image.fromarray(np.full((3, 4), 257 * 100, np.uint16)), (100, 100, 100)),
    ],
)
def test_modes_become_8bit_rgb(img, expected_pixel):
    out = decode_image(encode(img))
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert tuple(out[1, 1]) == expected_pixel


def test_exif_orientation_is_applied():
    arr = np.zeros((2, 6, 3), np.uint8)  # wide image, rotated by EXIF to tall
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.shape == (6, 2, 3)


def test_limits_are_checked_and_named():
    data = encode(Image.new("RGB", (100, 50)))
    with pytest.raises(ImageReadError, match="over the limit of 10 bytes"):
        decode_image(data, max_bytes=10)
    with pytest.raises(ImageReadError, match="100x50 = 5000 pixels is over the limit of 4999"):
        decode_image(data, max_pixels=4999)
    assert decode_image(data, max_pixels=5000).shape == (50, 100, 3)


def test_corrupt_data_is_an_image_read_error(tmp_path):
    with pytest.raises(ImageReadError, match="not a readable image"):
        decode_image(b"GIF89a but not really", name="x.gif")
    good = encode(Image.new("RGB", (30, 30), (200, 0, 0)), "JPEG")
    with pytest.raises(ImageReadError):
        decode_image(good[: len(good) // 3])
    with pytest.raises(ImageReadError, match="cannot read"):
        read_image(tmp_path / "missing.png")


def test_masks_round_trip(tmp_path):
    m = np.zeros((5, 6), bool)
    m[1:3, 2:5] = True
    write_mask(tmp_path / "a" / "m.png", m)
    back = read_mask(tmp_path / "a" / "m.png")
    assert back.dtype == np.uint8 and set(np.unique(back)) == {0, 255}
    assert np.array_equal(back == 255, m)

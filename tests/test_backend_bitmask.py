"""backend.labelstudio.bitmask: masks <-> the PNG data URL of Label Studio's BitmaskLabels regions."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from backend.labelstudio.bitmask import (
    PREFIX,
    bitmask_region,
    data_url_to_mask,
    mask_to_data_url,
    png_size,
)

# a 3x5 mask (rows top to bottom) and the same mask as the 8-bit RGBA PNG Label Studio's editor writes
KNOWN = np.array(
    [
        [0, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [0, 0, 1, 0, 1],
    ],
    dtype=bool,
)


def handmade_png(pixels: np.ndarray, color_type: int) -> bytes:
    """A PNG written byte by byte (no PIL): ``pixels`` HxWxC uint8, colour type 6 (RGBA) or 4 (grey+alpha),
    8 bits, filter 0 on every row."""
    h, w = pixels.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def as_url(png: bytes) -> str:
    return PREFIX + base64.b64encode(png).decode()


def test_known_mask_becomes_black_on_transparent_png() -> None:
    url = mask_to_data_url(KNOWN)
    assert url.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(url[len(PREFIX) :])))
    assert (img.format, img.mode, img.size) == ("PNG", "P", (5, 3))
    assert np.asarray(img).tolist() == KNOWN.astype(int).tolist()  # palette index 1 on the mask
    assert img.getpalette()[:6] == [0, 0, 0, 0, 0, 0] and img.info["transparency"] == 0  # index 0 clear
    rgba = np.asarray(img.convert("RGBA"))  # what a browser draws on the editor's canvas
    assert rgba[..., 3].tolist() == (KNOWN * 255).tolist()
    assert not rgba[..., :3].any()  # black everywhere: only the alpha carries the mask
    assert png_size(url) == (5, 3)


def test_handmade_png_decodes_to_the_known_mask() -> None:
    rgba = np.zeros((3, 5, 4), dtype=np.uint8)
    rgba[..., 3] = KNOWN * 255
    assert data_url_to_mask(as_url(handmade_png(rgba, 6)), 3, 5).tolist() == KNOWN.tolist()


def test_any_alpha_above_zero_is_the_region_as_in_the_editor() -> None:
    # a human's brush strokes have anti-aliased edges; the editor counts alpha > 0 (getCanvasPixelBounds)
    la = np.zeros((2, 3, 2), dtype=np.uint8)
    la[..., 0] = 200  # the colour does not matter
    la[..., 1] = [[0, 1, 128], [255, 0, 3]]
    mask = data_url_to_mask(as_url(handmade_png(la, 4)), 2, 3)
    assert mask.tolist() == [[False, True, True], [True, False, True]]


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 48), (300, 17)])
def test_round_trip_is_exact(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    for mask in (rng.random(shape) > 0.5, np.zeros(shape, bool), np.ones(shape, bool)):
        back = data_url_to_mask(mask_to_data_url(mask), *shape)
        assert back.dtype == bool and np.array_equal(back, mask)


def test_uint8_masks_count_above_zero() -> None:
    m = np.array([[0, 1, 255]], dtype=np.uint8)
    assert data_url_to_mask(mask_to_data_url(m), 1, 3).tolist() == [[False, True, True]]


def test_region_fields() -> None:
    region = bitmask_region(KNOWN, from_name="tag", to_name="image", label="Object", score=0.75, rid="r1")
    assert {k: v for k, v in region.items() if k != "value"} == {
        "id": "r1",
        "from_name": "tag",
        "to_name": "image",
        "type": "bitmasklabels",
        "original_width": 5,
        "original_height": 3,
        "image_rotation": 0,
        "score": 0.75,
        "readonly": False,
    }
    assert sorted(region["value"]) == ["bitmasklabels", "imageDataURL"]
    assert region["value"]["bitmasklabels"] == ["Object"]
    assert np.array_equal(data_url_to_mask(region["value"]["imageDataURL"], 3, 5), KNOWN)


def test_the_sdk_validates_the_region_against_bitmask_xml() -> None:
    # the check Label Studio's PredictionSerializer runs (when its prediction validation flag is on)
    from pathlib import Path

    from label_studio_sdk.label_interface import LabelInterface

    config = (Path(__file__).resolve().parents[1] / "label_config" / "bitmask.xml").read_text()
    region = bitmask_region(KNOWN, from_name="tag", to_name="image", label="Object", score=0.5, rid="r")
    li = LabelInterface(config)
    assert li.validate_prediction({"result": [region], "score": 0.5}, return_errors=True) == []
    wrong = {**region, "value": {**region["value"], "bitmasklabels": ["Nope"]}}
    assert li.validate_prediction({"result": [wrong]}, return_errors=True)


GOOD = mask_to_data_url(KNOWN)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (42, "must be a string"),
        ("data:image/jpeg;base64,/9j/4AAQ", "must start with 'data:image/png;base64,'"),
        (GOOD.replace(PREFIX, "data:image/png,"), "must start with"),
        (PREFIX + "not*base64!", "not valid base64"),
        (PREFIX + base64.b64encode(b"GIF89a" + bytes(40)).decode(), "not a PNG"),
        (PREFIX + base64.b64encode(b"\x89PNG").decode(), "not a PNG"),
        (mask_to_data_url(np.zeros((5, 3), bool)), "PNG is 3x5 .* is 5x3"),
        (GOOD[:-40], "not a readable PNG"),
        (GOOD + "%%%", "not valid base64"),
    ],
)
def test_bad_data_urls_are_value_errors_naming_the_problem(url: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        data_url_to_mask(url, 3, 5)


def test_mask_must_be_2d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        mask_to_data_url(np.zeros((2, 2, 2), bool))


@pytest.mark.slow
def test_a_browser_draws_the_png_as_the_editor_does() -> None:
    """Chromium decodes the data URL and draws it at (0, 0) on a canvas of its natural size, as Label
    Studio's editor does (``BitmaskRegion.restoreFromImageDataURL``): the canvas alpha is the mask."""

    webdriver = pytest.importorskip("selenium.webdriver")
    from browser import require_chromium

    browser, driver_bin = require_chromium()
    from selenium.webdriver.chrome.service import Service

    mask = np.random.default_rng(3).random((37, 53)) > 0.6
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_bin), options=options)
    try:
        got = driver.execute_async_script(
            """
            const done = arguments[arguments.length - 1];
            const image = new Image();
            image.src = arguments[0];
            image.decode().then(() => {
              const canvas = new OffscreenCanvas(image.naturalWidth, image.naturalHeight);
              const ctx = canvas.getContext("2d");
              ctx.drawImage(image, 0, 0);
              const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
              done({w: canvas.width, h: canvas.height, px: Array.from(px)});
            }).catch((e) => done({error: String(e)}));
            """,
            mask_to_data_url(mask),
        )
    finally:
        driver.quit()
    assert "error" not in got, got
    rgba = np.asarray(got["px"], dtype=np.uint8).reshape(got["h"], got["w"], 4)
    assert (got["w"], got["h"]) == (53, 37)
    assert np.array_equal(rgba[..., 3] == 255, mask) and set(np.unique(rgba[..., 3])) == {0, 255}
    assert not rgba[..., :3].any()

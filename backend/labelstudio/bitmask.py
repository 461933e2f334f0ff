"""Masks as Label Studio's BitmaskLabels regions: a PNG data URL per region instead of brush RLE.

What Label Studio 1.23.2 stores for a ``<BitmaskLabels>`` region (its editor, ``regions/BitmaskRegion.jsx``
and ``tags/object/Image/Image.js`` ``createSerializedResult``; the SDK's ``BitmaskLabelsTag`` validates the
same value)::

    {"from_name": "tag", "to_name": "image", "type": "bitmasklabels",
     "original_width": W, "original_height": H, "image_rotation": 0,
     "value": {"imageDataURL": "data:image/png;base64,...", "bitmasklabels": ["Object"]}}

The PNG is the size of the image (the editor draws it at (0, 0) onto a canvas of the PNG's own size and
writes it back from a canvas of the image's natural size): black pixels, opaque where the mask is, on a
transparent background. The editor reads a pixel as part of the region when its **alpha is above 0**
(``isHoveringNonTransparentPixel``, ``getCanvasPixelBounds``), whatever its colour; a human's brush strokes
have anti-aliased edges (alpha between 1 and 254), which count as the region, as in the editor.

:func:`mask_to_data_url` writes a palette PNG (black, alpha 0 or 255); the editor's own
``canvas.toDataURL("image/png")`` writes 8-bit RGBA. :func:`data_url_to_mask` reads any PNG a client
sends, after checking the prefix, the base64 text and the PNG header's size (:func:`png_size`, from the
first bytes only) against the region's ``original_width x original_height``, so nothing larger than the
declared image is ever decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
from typing import Any

import numpy as np

from .regions import mask_region

PREFIX = "data:image/png;base64,"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEAD_CHARS = 32  # base64 of the first 24 bytes: signature, IHDR length and type, width, height


def mask_to_data_url(mask: np.ndarray) -> str:
    """HxW mask (bool, or uint8 where > 0 is the mask) -> ``data:image/png;base64,...`` of a PNG of the same
    size: opaque black on the mask, fully transparent elsewhere (a two-colour palette, both black, with a
    ``tRNS`` alpha of 0 and 255: what a browser draws is the editor's black on transparent, at a twentieth
    of the time and a quarter of the size of an RGBA PNG)."""
    from PIL import Image

    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (HxW), got shape {m.shape}")
    h, w = m.shape
    img = Image.frombytes("P", (w, h), (m > 0).astype(np.uint8).tobytes())
    img.putpalette([0, 0, 0, 0, 0, 0])
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=bytes([0, 255]))
    return PREFIX + base64.b64encode(buf.getvalue()).decode("ascii")


def png_size(data_url: Any) -> tuple[int, int]:
    """``(width, height)`` a PNG data URL declares in its IHDR chunk, read from its first 32 base64
    characters only. Raises ValueError when ``data_url`` is not a string starting with
    :data:`PREFIX` followed by a PNG."""
    if not isinstance(data_url, str):
        raise ValueError(f"imageDataURL must be a string, got {type(data_url).__name__}")
    if not data_url.startswith(PREFIX):
        raise ValueError(f"imageDataURL must start with {PREFIX!r}, got {data_url[:40]!r}")
    try:
        head = base64.b64decode(data_url[len(PREFIX) : len(PREFIX) + _HEAD_CHARS], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("imageDataURL is not valid base64") from None
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise ValueError("imageDataURL is not a PNG (no PNG signature and IHDR chunk)")
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


def data_url_to_mask(data_url: Any, height: int, width: int) -> np.ndarray:
    """Decode a BitmaskLabels ``imageDataURL`` -> bool HxW mask (alpha > 0, as the editor reads it).

    Raises ValueError on a malformed data URL or PNG, or a PNG whose size is not ``width x height``
    (checked before the pixels are decoded)."""
    from PIL import Image, UnidentifiedImageError

    w, h = png_size(data_url)
    if (w, h) != (width, height):
        raise ValueError(
            f"the imageDataURL PNG is {w}x{h} (width x height), the region's original_width x "
            f"original_height is {width}x{height}"
        )
    try:
        raw = base64.b64decode(data_url[len(PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("imageDataURL is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as img:
            img.load()
            rgba = np.asarray(img.convert("RGBA"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"imageDataURL is not a readable PNG ({type(exc).__name__})") from None
    if rgba.shape[:2] != (height, width):  # the header was checked; a lying PNG decoder is not trusted
        raise ValueError(f"the imageDataURL PNG decoded to {rgba.shape[1]}x{rgba.shape[0]}")
    return rgba[..., 3] > 0


def bitmask_region(
    mask: np.ndarray, *, from_name: str, to_name: str, label: str, score: float, rid: str
) -> dict[str, Any]:
    """One BitmaskLabels region for a bool HxW mask at the image's original size."""
    value = {"imageDataURL": mask_to_data_url(mask), "bitmasklabels": [label]}
    return mask_region(
        "bitmasklabels", mask.shape, value, from_name=from_name, to_name=to_name, score=score, rid=rid
    )

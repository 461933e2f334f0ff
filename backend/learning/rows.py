"""What a row of the store holds (:class:`Correction`, :class:`SkippedCorrection`) and how: the mask as a
1-bit PNG (checked from its header before it is decoded), Label Studio's times as Unix seconds."""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from PIL import Image

from cosod.imageio import DEFAULT_MAX_PIXELS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Correction:
    """A stored corrected mask. ``mask``: bool HxW at the image's original size, or None for an empty
    correction whose size is unknown (an annotation with no region: "no object in this image")."""

    project: int
    annotation_id: int
    task_id: int
    group_key: str
    image_url: str
    image_hash: str | None
    mask: np.ndarray | None
    width: int
    height: int
    empty: bool
    updated: float


@dataclass(frozen=True)
class SkippedCorrection:
    """A stored row :meth:`Store.load_corrections` could not use, and why."""

    project: int
    annotation_id: int
    task_id: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ls_time(text: str | None) -> float | None:
    """Label Studio's ``updated_at`` (ISO 8601, e.g. ``2026-11-22T10:00:00.123456Z``; naive means UTC) as Unix
    seconds; None when missing or not a time."""
    if not text or not isinstance(text, str) or len(text) > 64:
        return None
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def mask_to_png(mask: np.ndarray) -> bytes:
    """bool HxW -> 1-bit PNG bytes (lossless, small)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def png_to_mask(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, size: tuple[int, int] | None = None
) -> np.ndarray:
    """PNG bytes -> bool HxW. The PNG's header is read before anything is decoded: at most ``max_pixels``
    pixels, and ``size`` (``(width, height)``) when given; ValueError otherwise (also for bytes that are
    no PNG)."""
    if len(data) < 24 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("the stored mask is not a readable PNG (no PNG header)")
    w, h = struct.unpack(">II", data[16:24])
    if w * h > max_pixels:
        raise ValueError(f"the stored mask is {w}x{h}, over the limit of {max_pixels} pixels")
    if size is not None and (w, h) != tuple(size):
        raise ValueError(f"the stored mask is {w}x{h}, its row says {size[0]}x{size[1]}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked above
            with Image.open(io.BytesIO(data)) as im:
                return np.asarray(im.convert("L")) > 0
    except Image.DecompressionBombError as exc:  # a max_pixels above Pillow's own limit
        raise ValueError(f"the stored mask is over Pillow's size limit ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated, corrupt
        raise ValueError(f"the stored mask is not a readable PNG ({exc})") from None

"""Reading images safely: size limits before decoding, EXIF orientation, any mode to 8-bit RGB.

Every image that enters the pipeline goes through :func:`decode_image`, so the command line and the Label
Studio backend apply the same rules: the byte count is checked before anything is parsed, the pixel count
from the header is checked before the pixels are decoded, and grey, palette, RGBA, CMYK and 16-bit images
all come out as ``HxWx3 uint8`` RGB.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageReadError

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        grey = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent -> white
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def decode_image(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str = "image",
) -> np.ndarray:
    """Encoded bytes -> HxWx3 uint8 RGB, EXIF orientation applied.

    Raises :class:`ImageReadError` when the data is larger than ``max_bytes``, the header announces more than
    ``max_pixels`` pixels, or the data is not a decodable image. The message names ``name`` and the limit.
    """
    if len(data) > max_bytes:
        raise ImageReadError(f"{name}: {len(data)} bytes is over the limit of {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageReadError(f"{name}: {w}x{h} = {w * h} pixels is over the limit of {max_pixels}")
            img.load()
            img = ImageOps.exif_transpose(img) or img
            arr = _to_rgb(img)
    except ImageReadError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise ImageReadError(f"{name}: not a readable image ({exc.__class__.__name__}: {exc})") from exc
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        raise ImageReadError(f"{name}: decoded to an unusable array of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def read_image(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """A file -> HxWx3 uint8 RGB (see :func:`decode_image`). The size is checked before the file is read."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise ImageReadError(f"{p}: {size} bytes is over the limit of {max_bytes} bytes")
        data = p.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"{p}: cannot read ({exc.strerror or exc})") from exc
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, name=str(p))


def read_images(
    paths: Sequence[str | os.PathLike[str]], **limits: int
) -> tuple[list[np.ndarray], list[Path], list[str]]:
    """Read several files with :func:`read_image`: the images, the paths that were read, and the reasons of
    those that could not be (each also logged). One bad file never stops the others."""
    images: list[np.ndarray] = []
    ok: list[Path] = []
    failed: list[str] = []
    for path in paths:
        try:
            images.append(read_image(path, **limits))
            ok.append(Path(path))
        except ImageReadError as exc:
            log.warning("skipped: %s", exc)
            failed.append(str(exc))
    return images, ok, failed


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """A mask PNG -> HxW uint8 in 0..255 (grey conversion of whatever mode it was saved in)."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageReadError(f"{path}: not a readable mask ({exc})") from exc


def write_mask(path: str | os.PathLike[str], mask: np.ndarray) -> None:
    """Write a bool or 0..255 mask as an 8-bit PNG of 0/255 (bool) or the given values."""
    arr = np.asarray(mask)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)  # uint8 2-D -> mode L

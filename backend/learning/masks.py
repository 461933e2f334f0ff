"""An annotation's result -> one boolean mask: the union of its BrushLabels (RLE) and BitmaskLabels (PNG data
URL) regions, with every limit checked before anything is decoded (the rules are listed in
:mod:`backend.learning.corrections`, which stores what this returns).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cosod.imageio import DEFAULT_MAX_PIXELS

from ..errors import BadRequestError, CorrectionRefusedError, quote
from ..labelstudio.bitmask import data_url_to_mask, png_size
from ..labelstudio.regions import rle_header, rle_to_mask_fast

log = logging.getLogger(__name__)

MAX_REGIONS = 10_000  # regions (of any control) in one annotation
MAX_RLE_BYTES = 2 << 20  # RLE bytes of one annotation, all brush regions: about 1 s of decoding at worst
MAX_BITMASK_CHARS = 8 << 20  # imageDataURL characters of one annotation, all bitmask regions (6 MiB of PNG)
MAX_DECODED_IMAGES = 8  # brush/bitmask regions of one annotation decode at most this many x max_pixels px


def union_brush_mask(
    result: Sequence[Mapping[str, Any]],
    *,
    from_names: Sequence[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray | None:
    """bool HxW union of the BrushLabels and BitmaskLabels regions in an annotation ``result``; None when
    there is none.

    ``from_names``: only regions of these controls (default: every brushlabels and bitmasklabels region).
    Every region is checked before any mask is decoded (module doc: at most ``max_pixels`` pixels per
    region, the RLE header declaring ``4*H*W`` values or the PNG header ``W x H``, regions agreeing on the
    image size, the per-annotation budgets): :class:`~backend.errors.CorrectionRefusedError` when a limit or
    a header says no, :class:`~backend.errors.BadRequestError` (both ValueErrors) for a malformed region or
    a mask that does not decode to its size.
    """
    if not isinstance(result, list):
        raise BadRequestError(f"annotation result must be a list of regions, got {type(result).__name__}")
    if len(result) > MAX_REGIONS:
        raise CorrectionRefusedError(
            f"annotation result has {len(result)} regions, over the limit of {MAX_REGIONS} per annotation"
        )
    parts = _mask_regions(result, from_names, max_pixels)
    mask: np.ndarray | None = None
    for k, h, w, kind, payload in parts:
        try:
            if kind == BITMASK:
                part = data_url_to_mask(payload, h, w)
            else:
                part = rle_to_mask_fast(payload, h, w) > 0
        except ValueError as exc:
            raise BadRequestError(f"region {k}: {exc}") from None
        if mask is None:
            mask = part
        else:
            mask |= part
    return mask


def _size_of(k: int, region: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(height, width)`` a region declares; None when it declares none."""
    h, w = region.get("original_height"), region.get("original_width")
    if h is None and w is None:
        return None
    for v in (h, w):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise BadRequestError(
                f"region {k}: original_height/original_width must be positive ints, got {quote(h)}/{quote(w)}"
            )
    assert isinstance(h, int) and isinstance(w, int)
    return h, w


BRUSH, BITMASK = "brushlabels", "bitmasklabels"


def _payload(kind: str, value: Any) -> Any:
    """The RLE (brush) or ``imageDataURL`` (bitmask) of a region's value; None when it has none."""
    if not isinstance(value, Mapping):
        return None
    if kind == BITMASK:
        return value.get("imageDataURL")
    return value["rle"] if value.get("format", "rle") == "rle" and "rle" in value else None


def _check_header(k: int, kind: str, payload: Any, h: int, w: int) -> int:
    """Check the size a region's mask declares against its ``h x w`` without decoding it; returns its size
    in bytes (RLE) or characters (data URL)."""
    try:
        declared = png_size(payload) if kind == BITMASK else rle_header(payload)
    except ValueError as exc:
        raise BadRequestError(f"region {k}: {exc}") from None
    if kind == BITMASK and declared != (w, h):
        raise CorrectionRefusedError(
            f"region {k}: its imageDataURL PNG is {declared[0]}x{declared[1]} (width x height), the "
            f"region's original_width x original_height is {w}x{h}"
        )
    if kind == BRUSH and declared != (4 * h * w, 8):
        raise CorrectionRefusedError(
            f"region {k}: its RLE header declares {declared[0]} values of {declared[1]} bits, a {h}x{w} "
            f"brush mask holds 4*{h}*{w} = {4 * h * w} values of 8 bits"
        )
    return len(payload)


def _mask_regions(
    result: list[Any], from_names: Sequence[str] | None, max_pixels: int
) -> list[tuple[int, int, int, str, Any]]:
    """The brush and bitmask regions to decode, ``(index, height, width, type, rle or data URL)``, each
    checked without decoding."""
    sizes: dict[Any, tuple[int, tuple[int, int]]] = {}  # to_name -> (first region index, (h, w))
    found: list[tuple[int, int, int, str, Any]] = []
    spent = {BRUSH: 0, BITMASK: 0}  # RLE bytes, data URL characters
    caps = {BRUSH: (MAX_RLE_BYTES, "RLE bytes"), BITMASK: (MAX_BITMASK_CHARS, "imageDataURL characters")}
    pixels = 0
    for k, region in enumerate(result):
        if not isinstance(region, Mapping):
            continue
        kind = str(region.get("type", "")).lower()
        is_mask = kind in (BRUSH, BITMASK)
        if is_mask and from_names is not None and region.get("from_name") not in from_names:
            continue
        size = _size_of(k, region) if is_mask or "original_width" in region else None
        if size is not None:
            to_name = region.get("to_name")
            to_name = to_name if isinstance(to_name, str) else None
            first = sizes.setdefault(to_name, (k, size))
            if first[1] != size:
                raise CorrectionRefusedError(
                    f"region {k} is {size[0]}x{size[1]} (original_height x original_width), region "
                    f"{first[0]} on the same image {first[1][0]}x{first[1][1]}: the regions disagree on the "
                    "image size"
                )
        if not is_mask:
            continue
        payload = _payload(kind, region.get("value"))
        if payload is None:
            log.debug("region %d has no RLE or imageDataURL; skipped", k)
            continue
        if size is None:
            raise BadRequestError(f"region {k}: a {kind} region needs original_height and original_width")
        h, w = size
        if h * w > max_pixels:
            raise CorrectionRefusedError(
                f"region {k} is {h}x{w} = {h * w} pixels, over the limit of {max_pixels} "
                "(COSOD_MAX_IMAGE_PIXELS, the limit of task images)"
            )
        spent[kind] += _check_header(k, kind, payload, h, w)
        pixels += h * w
        cap, unit = caps[kind]
        if spent[kind] > cap:
            raise CorrectionRefusedError(
                f"the {kind} regions up to region {k} hold {spent[kind]} {unit}, over the limit of {cap} "
                "per annotation"
            )
        if pixels > MAX_DECODED_IMAGES * max_pixels:
            raise CorrectionRefusedError(
                f"the brush and bitmask regions up to region {k} hold {pixels} pixels, over the limit of "
                f"{MAX_DECODED_IMAGES} x {max_pixels} per annotation"
            )
        found.append((k, h, w, kind, payload))
    return found
